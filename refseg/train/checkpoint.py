"""Checkpoints: the run state, save / restore inside a worker, and the export to ``model.pt``.

A checkpoint dir holds DeepSpeed's files under ``ckpt/`` (every rank's ZeRO shard), the resolved
``config.yaml`` and ``refseg_state.json`` (:class:`RunState`, also kept in DeepSpeed's client state).

    save_checkpoint(engine, directory, cfg, state, rank)     # every rank
    state = load_checkpoint(engine, directory)                # any world size: refseg.train.reshard
    export_checkpoint(directory, out / "model.pt")            # offline: no Ray, any ZeRO stage
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from refseg.config import Config, ConfigError, config_from_dict, load_yaml
from refseg.config.schema import selection_metric
from refseg.io import read_bytes, resolve_path

CKPT_TAG = "ckpt"
STATE_FILE = "refseg_state.json"
LOCAL_CHECKPOINTS = "checkpoints"  # Ray Train local mode: <output_dir>/checkpoints/epoch_NNNN[.step_S]
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's checkpoints, in its storage
NOT_VALIDATED = -1.0  # the score reported with a stopped run's checkpoint: ranks it below every validated one


@dataclasses.dataclass
class RunState:
    """The run's progress, saved in every checkpoint (``to_dict`` is the JSON of refseg_state.json).

    ``history``: one metrics dict per finished epoch (what metrics.jsonl lists). The ``budget_*`` fields
    and ``epochs`` exist with ``train.time_budget_s`` only: the ``time.time()`` the current
    ``refseg train`` call started, the budget seconds earlier calls spent and all calls together, and
    the epoch count fitted to the budget. ``partial`` exists when the run stopped inside epoch
    ``epoch + 1`` (:func:`refseg.train.epoch.train_epoch`): its optimizer ``steps`` so far, the sums over
    every rank (``loss_sum`` of ``losses`` micro-batch losses, ``samples``, ``time_s`` seconds) and the
    ref ids it trained (``seen``), so that a resume finishes the epoch with the rest of its samples.
    ``world``: the worker count that saved it; ``resizes``: one :func:`resize_record` per restore at
    another worker count (elastic training)."""

    epoch: int = 0  # epochs finished
    global_step: int = 0  # optimizer steps taken
    history: list[dict] = dataclasses.field(default_factory=list)
    budget_t0: float | None = None
    budget_spent_before_s: float | None = None
    budget_used_s: float | None = None
    epochs: int | None = None
    partial: dict | None = None
    world: int | None = None
    resizes: list[dict] | None = None

    def to_dict(self) -> dict:
        """The JSON form; the fields that are None are left out (a run without a budget has none)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> RunState:
        return cls(**data)


def score_key(cfg: Config) -> str:
    """The validation metric that ranks a run's checkpoints (the best one becomes model.pt): ``val_ciou`` on
    generalized data (``data.dataset`` in GENERALIZED_DATASETS), else ``val_oiou``."""
    return selection_metric(cfg.data.dataset)


def save_checkpoint(engine, directory: Path, cfg: Config, state: RunState, rank: int) -> None:
    """Every rank writes its ZeRO shard; rank 0 adds the resolved config and the run state (with the
    worker count, ``state.world``)."""
    state.world = engine.dp_world_size
    engine.save_checkpoint(str(directory), tag=CKPT_TAG, client_state={"refseg": state.to_dict()})
    if rank == 0:
        (directory / "config.yaml").write_text(cfg.to_yaml())
        (directory / STATE_FILE).write_text(json.dumps(state.to_dict(), indent=1))


def load_checkpoint(engine, directory: Path) -> RunState:
    """Restore model, optimizer, LR schedule and the refseg run state from a checkpoint dir. A checkpoint
    saved at another worker count is resharded (:func:`refseg.train.reshard.load_resharded`) and the
    resize joins ``RunState.resizes``."""
    from refseg.train.reshard import load_resharded, saved_world

    saved, world = saved_world(directory, CKPT_TAG), engine.dp_world_size
    if saved in (None, world):
        _, client = engine.load_checkpoint(str(directory), tag=CKPT_TAG)
    else:
        client = load_resharded(engine, directory, CKPT_TAG)
    state = RunState.from_dict(dict(client["refseg"])) if client and "refseg" in client else read_state(directory)
    saved = state.world or saved
    if saved is not None and saved != world:
        state.resizes = [*(state.resizes or []), resize_record(state, saved, world)]
    return state


def resize_record(state: RunState, before: int, after: int) -> dict:
    """One entry of ``RunState.resizes``: when (UTC), from / to how many workers, why, and the checkpoint
    (epochs done, global step) the new worker group went on from. Ray Train shrinks an elastic group
    only when a worker was lost and grows it when the cluster has room again."""
    why = ("a worker was lost (its node failed or was preempted): going on with the workers left" if after < before
           else "the cluster has room for more workers again (a node joined)")
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "from": before, "to": after, "why": why,
            "epoch": state.epoch, "step": state.global_step}


def read_state(directory: Path) -> RunState:
    """The run state a checkpoint dir holds (its refseg_state.json), without DeepSpeed."""
    return RunState.from_dict(json.loads((directory / STATE_FILE).read_text()))


def local_checkpoint_dir(output_dir: str | Path, state: RunState) -> Path:
    """Where Ray Train local mode keeps the checkpoint of ``state``: ``epoch_NNNN`` after epoch NNNN, or
    ``epoch_NNNN.step_SSSSSSSSS`` when the run stopped at global step S inside the next epoch (the names
    sort in the order the run wrote them)."""
    name = f"epoch_{state.epoch:04d}" + (f".step_{state.global_step:09d}" if state.partial else "")
    return Path(output_dir) / LOCAL_CHECKPOINTS / name


def local_checkpoints(output_dir: str | Path) -> list[Path]:
    """The local-mode checkpoint dirs of ``output_dir``, oldest first."""
    return sorted((Path(output_dir) / LOCAL_CHECKPOINTS).glob("epoch_*"))


def checkpoint_epoch(directory: Path) -> int | None:
    """The epoch a local-mode checkpoint dir ends, or None for one inside an epoch (a stopped run's)."""
    name = directory.name.removeprefix("epoch_")
    return int(name) if name.isdigit() else None


def check_resume(output_dir: str | Path, local: bool) -> None:
    """``--resume``: raise ConfigError unless ``output_dir`` holds a run with a checkpoint to continue from.
    Reads files only (no Ray) and creates nothing."""
    out = Path(output_dir).expanduser().resolve()
    run_file = out / "run.json"
    if not run_file.is_file():
        raise ConfigError(f"--resume: '{out}' holds no run to continue (no run.json); start the run without --resume")
    if local:
        found = bool(local_checkpoints(out))
    else:
        run = json.loads(run_file.read_text())
        try:
            snapshot = json.loads(read_bytes(resolve_path(run["storage_path"], f"{run['name']}/{RAY_SNAPSHOT}")))
            found = snapshot.get("latest_checkpoint_result") is not None
        except (FileNotFoundError, json.JSONDecodeError):
            found = False
    if not found and not local and local_checkpoints(out):
        raise ConfigError(f"--resume: the run in '{out}' was started with --local; resume it with --local")
    if not found:
        raise ConfigError(f"--resume: the run in '{out}' has no checkpoint to continue from (it stopped before "
                          "its first one); start it again without --resume in a new --output-dir")


def save_and_report(engine, cfg: Config, state: RunState, metrics: dict, rank: int, output_dir: str,
                    local: bool) -> None:
    """Save a checkpoint of every rank and ``ray.train.report`` it with the epoch's ``metrics``.

    Local mode keeps the dir under ``output_dir`` (Ray Train keeps only a reference there); otherwise
    Ray copies a temporary dir into the run's storage."""
    import shutil
    import tempfile

    import ray.train
    from ray.train import Checkpoint

    if local:
        directory = local_checkpoint_dir(output_dir, state)
        directory.mkdir(parents=True, exist_ok=True)
        save_checkpoint(engine, directory, cfg, state, rank)
        ray.train.report(metrics)
        return
    directory = Path(tempfile.mkdtemp(prefix="refseg-ckpt-"))
    try:
        save_checkpoint(engine, directory, cfg, state, rank)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(directory)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def export_checkpoint(ckpt_dir: str | Path, out_path: str | Path) -> Path:
    """DeepSpeed checkpoint dir (any ZeRO stage) -> ``model.pt`` (fp32 weights + resolved config).

    The file loads with ``refseg.models.export.load_model`` — no DeepSpeed or Ray needed.
    """
    from refseg.models import build_model
    from refseg.models.export import save_model
    from refseg.train.zero_reader import fp32_state_dict

    ckpt_dir = Path(ckpt_dir)
    cfg = config_from_dict(load_yaml(ckpt_dir / "config.yaml"))
    state = fp32_state_dict(ckpt_dir, CKPT_TAG)  # unpickles no code: a crafted file is one sentence
    model = build_model(cfg.model, pretrained=False)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers_only = all(k.endswith(("num_batches_tracked",)) for k in missing)
    if unexpected or not buffers_only:
        raise RuntimeError(f"checkpoint {ckpt_dir} does not match the model: missing={missing[:5]} "
                           f"unexpected={unexpected[:5]}")
    out_path = Path(out_path)
    save_model(out_path, model.float(), cfg.to_dict())
    return out_path
