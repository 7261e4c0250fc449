"""Experiment trackers behind one small interface: MLflow, TensorBoard and, when installed, Weights & Biases.

    trackers = open_trackers(cfg, output_dir, run_name, resume_step)   # rank 0 of a run (train.tracking)
    for t in trackers:
        t.log_metrics({"step/loss": 0.41, ...}, step=120)             # every train.log_every steps
        t.log_metrics(history[-1], step=history[-1]["step"])          # each epoch: its metrics.jsonl line
    finish_trackers(cfg, output_dir, run_name, [curves, model], status="FINISHED")  # the driver, after fit()

Every value goes on one x axis, the optimizer step: per-step figures as ``step/<name>``, each epoch's
metrics under the keys of its metrics.jsonl line (``loss``, ``val_oiou``, ``epoch``, ...). The resolved
config goes in as params (dotted keys). A run is found again by its Ray Train run name (MLflow tag
``refseg.run``, the wandb run id), so a restarted worker, a ``--resume`` and the driver's final call
all log to the same run.

- ``mlflow``: ``train.tracking_uri`` (a server, ``sqlite:///...``, ``databricks``), by default a SQLite
  store in ``<output_dir>/mlflow/mlflow.db`` with artifacts in ``<output_dir>/mlflow/artifacts``;
  experiment ``refseg``. Needs ``mlflow-skinny`` (or ``mlflow``).
- ``tensorboard``: event files in ``<output_dir>/tb`` (``tensorboard --logdir <output_dir>/tb``); a
  resumed run purges the events after its checkpoint's step. Needs ``tensorboard``.
- ``wandb``: project ``refseg``, files under ``<output_dir>/wandb``; ``WANDB_MODE=offline`` works
  without a network.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Protocol

from refseg.config import Config, ConfigError
from refseg.config.validate import TRACKERS

EXPERIMENT = "refseg"
RUN_TAG = "refseg.run"
TB_DIR = "tb"
MLFLOW_DIR = "mlflow"
STEP_PREFIX = "step/"
MLFLOW_PARAM_BATCH = 100  # MLflow's most params per log_batch call
MLFLOW_PARAM_CHARS = 6000  # and its longest param value
FINISHED, KILLED = "FINISHED", "KILLED"


class Tracker(Protocol):
    """What the training run asks of a tracker."""

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Log the numeric values of ``metrics`` at optimizer step ``step``."""

    def log_artifacts(self, paths: list[Path]) -> None:
        """Attach these files or folders to the run."""

    def close(self, status: str | None = None) -> None:
        """Flush; with ``status`` (FINISHED / KILLED) the run ends."""


def numeric(metrics: dict) -> dict[str, float]:
    """The values of ``metrics`` a tracker can plot (numbers and booleans) as floats."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    """A nested config dict as dotted keys -> strings: ``{"train.lr": "0.0001", ...}``."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:MLFLOW_PARAM_CHARS]
    return out


def check_trackers(tracking: list[str]) -> None:
    """Before Ray starts: every tracker of ``train.tracking`` has its Python package (of the tracker's
    name) installed, else one ConfigError sentence naming it."""
    import importlib.util

    for name in tracking:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"train.tracking: '{name}' needs the Python package '{name}', which is not installed; "
                              f"pip install 'refseg[tracking]' (wandb: pip install wandb) or remove '{name}' from "
                              "train.tracking")


def quiet_tracker_logs() -> None:
    """No INFO lines from MLflow's store set-up (alembic's migrations) unless ``refseg -v``."""
    from refseg.runtime import verbose

    if not verbose():
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)


def mlflow_location(cfg: Config, output_dir: str | Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment): ``train.tracking_uri`` (the server's own
    artifact store), else the SQLite store under ``output_dir``."""
    if cfg.train.tracking_uri:
        return cfg.train.tracking_uri, None
    base = Path(output_dir) / MLFLOW_DIR
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}", (base / "artifacts").as_uri()


class MlflowTracker:
    """One MLflow run, found by its ``refseg.run`` tag or created with the config as params."""

    def __init__(self, uri: str, artifact_location: str | None, run_name: str, params: dict[str, str]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        quiet_tracker_logs()
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = find_mlflow_run(self.client, run_name)
        if self.run_id is None:
            experiment_id = mlflow_experiment(self.client, EXPERIMENT, artifact_location)
            run = self.client.create_run(experiment_id, run_name=run_name, tags={RUN_TAG: run_name})
            self.run_id = run.info.run_id
            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), MLFLOW_PARAM_BATCH):
                self.client.log_batch(self.run_id, params=items[i: i + MLFLOW_PARAM_BATCH])

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in numeric(metrics).items()])

    def log_artifacts(self, paths: list[Path]) -> None:
        for p in paths:
            if Path(p).is_dir():
                self.client.log_artifacts(self.run_id, str(p), artifact_path=Path(p).name)
            else:
                self.client.log_artifact(self.run_id, str(p))

    def close(self, status: str | None = None) -> None:
        if status is not None:
            self.client.set_terminated(self.run_id, status)


def mlflow_experiment(client, name: str, artifact_location: str | None) -> str:
    """The id of MLflow experiment ``name``, created with ``artifact_location`` (None: the store's default)
    when missing -- by another process meanwhile too (concurrent trials on one server)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        return client.get_experiment_by_name(name).experiment_id


def find_mlflow_run(client, run_name: str) -> str | None:
    """The id of the MLflow run tagged ``refseg.run=<run_name>`` in the ``refseg`` experiment, or None."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_name}'",
                              max_results=1)
    return runs[0].info.run_id if runs else None


class TensorBoardTracker:
    """Event files in ``logdir``, scalars in float64; the config as text on a fresh run."""

    def __init__(self, logdir: Path, resume_step: int, config_yaml: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        fresh = not any(Path(logdir).glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=resume_step or None)
        if fresh:
            self.writer.add_text("config", "    " + config_yaml.replace("\n", "\n    "), 0)

    def log_metrics(self, metrics: dict, step: int) -> None:
        for k, v in numeric(metrics).items():
            self.writer.add_scalar(k, v, step, new_style=True, double_precision=True)
        self.writer.flush()

    def log_artifacts(self, paths: list[Path]) -> None:
        """TensorBoard keeps no files (the curves are its scalars)."""

    def close(self, status: str | None = None) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run with the Ray Train run name as its id (resumed when it exists)."""

    def __init__(self, output_dir: Path, run_name: str, params: dict) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=EXPERIMENT, name=run_name, id=re.sub(r"[^\w.-]", "-", run_name),
                              resume="allow", dir=str(output_dir), config=params)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.run.log(numeric(metrics), step=step)

    def log_artifacts(self, paths: list[Path]) -> None:
        artifact = self.wandb.Artifact(f"{self.run.id}-outputs", type="model")
        for p in paths:
            if Path(p).is_dir():
                artifact.add_dir(str(p), name=Path(p).name)
            else:
                artifact.add_file(str(p))
        self.run.log_artifact(artifact)

    def close(self, status: str | None = None) -> None:
        if status is not None:
            self.run.finish(exit_code=0 if status == FINISHED else 1)


def open_trackers(cfg: Config, output_dir: str | Path, run_name: str, resume_step: int = 0,
                  kinds: tuple[str, ...] = TRACKERS) -> list[Tracker]:
    """The trackers ``train.tracking`` names (those among ``kinds``), on the run ``run_name`` (created, or
    found again). ``resume_step``: the optimizer step the run continues from (0: a fresh start)."""
    out = Path(output_dir)
    trackers: list[Tracker] = []
    for name in (n for n in cfg.train.tracking if n in kinds):
        if name == "mlflow":
            trackers.append(MlflowTracker(*mlflow_location(cfg, out), run_name, flat_params(cfg.to_dict())))
        elif name == "tensorboard":
            trackers.append(TensorBoardTracker(out / TB_DIR, resume_step, cfg.to_yaml()))
        elif name == "wandb":
            trackers.append(WandbTracker(out, run_name, cfg.to_dict()))
    return trackers


def finish_trackers(cfg: Config, output_dir: str | Path, run_name: str, paths: list[Path], status: str) -> None:
    """The driver after ``fit()``: attach ``paths`` (curves, metrics, the model) to the run of every
    tracker and end it with ``status``."""
    for tracker in open_trackers(cfg, output_dir, run_name, kinds=("mlflow", "wandb")):
        tracker.log_artifacts([p for p in paths if Path(p).exists()])
        tracker.close(status)
