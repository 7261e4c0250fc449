"""Hyperparameter sweeps: Ray Tune runs one training driver (TorchTrainer + DeepSpeed) per trial.

    refseg tune --config configs/debug.yaml --space tune/fusion_lr.yaml --num-samples 8 --output-dir runs/sweep
    refseg tune --resume runs/sweep          # finish an interrupted sweep; finished trials are not re-run

A search space is YAML mapping dotted config keys to one distribution each::

    model.fusion.num_layers: {choice: [1, 2, 3, 4, 5, 6]}
    train.lr: {loguniform: [1.0e-5, 1.0e-3]}     # also {uniform: [lo, hi]}, {randint: [lo, hi]} (hi inclusive)

Every trial is a Tune function trainable (the "train driver" of Ray's Train+Tune user guide): it builds
the trial's config and runs the same ``make_trainer`` / ``finish_training`` as ``refseg train`` into
``DIR/trials/<trial_id>/``; a TuneReportCallback subclass forwards each validated epoch to Tune, where ASHA
(``tune.scheduler``) picks weak trials on ``tune.metric`` and the trial ends its own Train run (see
``DECISION``). At most as many trials run at once as leave CPUs for Ray Data (:func:`max_concurrent_trials`).
Outputs in DIR: trials.csv, best.yaml, summary.json, trials.png, sweep.json (what --resume needs) and
tune/ (Tune's experiment state).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from refseg.config import Config, ConfigError, _closest, _deepcopy, _fix_floats, config_from_dict

log = logging.getLogger("refseg.tune")

KINDS = ("choice", "loguniform", "uniform", "randint")
TRIAL_CPUS = 0.1  # the trial function only drives its Train run (workers are separate actors)
PATH_KEYS = ("data.root", "data.image_dir", "data.parquet", "data.manifest", "train.storage_path",
             "deepspeed.config_file", "model.text.encoder", "model.text.tokenizer", "model.vision.weights")


# ----------------------------------------------------------------------------- the search space
def _get(d: Any, key: str) -> Any:
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else getattr(d, part, None)
    return d


def _set(d: dict, key: str, value: Any) -> None:
    *head, last = key.split(".")
    for part in head:
        if not isinstance(d.get(part), dict):
            d[part] = {}
        d = d[part]
    d[last] = value


def _plain(v: Any) -> Any:
    """numpy scalars / arrays (what Tune samples) -> Python values the config schema accepts."""
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _check_key(key: str, where: str) -> None:
    """``key`` must name a leaf of the config schema (not a section, not ``tune.*``)."""
    import dataclasses

    node: Any = Config()
    seen = []
    for part in key.split("."):
        names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
        if part not in names:
            prefix = ".".join(seen)
            raise ConfigError(f"unknown config key '{key}' in search space {where}"
                              f"{_closest(part, names) if names else ''}"
                              + (f" (under '{prefix}')" if prefix and names else ""))
        seen.append(part)
        node = getattr(node, part)
    if dataclasses.is_dataclass(node):
        raise ConfigError(f"search space {where}: '{key}' is a config section; search one of its keys, "
                          f"e.g. '{key}.{dataclasses.fields(node)[0].name}'")
    if key.startswith("tune."):
        raise ConfigError(f"search space {where}: '{key}' configures the sweep itself and cannot be searched")


def _check_spec(key: str, spec: Any, where: str) -> tuple[str, list]:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"search space {where}: '{key}' must map to exactly one of "
                          f"{{choice: [...]}}, {{loguniform: [lo, hi]}}, {{uniform: [lo, hi]}}, "
                          f"{{randint: [lo, hi]}}; got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"search space {where}: '{key}: {{choice: ...}}' needs a non-empty list of values")
        return kind, args
    if (not isinstance(args, list) or len(args) != 2
            or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
        raise ConfigError(f"search space {where}: '{key}: {{{kind}: ...}}' needs two numbers [lo, hi], got {args!r}")
    lo, hi = args
    if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise ConfigError(f"search space {where}: '{key}: {{randint: [lo, hi]}}' needs integers, got {args!r}")
    if not lo < hi:
        raise ConfigError(f"search space {where}: '{key}: {{{kind}: [{lo}, {hi}]}}' needs lo < hi")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"search space {where}: '{key}: {{loguniform: [{lo}, {hi}]}}' needs lo > 0")
    return kind, args


def parse_space(data: Any, base: dict | None = None, where: str = "<space>") -> dict[str, tuple[str, list]]:
    """Validate a search-space mapping -> ``{dotted key: (kind, args)}``.

    Every key must be a config leaf; every candidate value (each choice, both bounds) must be a valid
    value for that key on top of ``base`` (the raw config dict), so type errors show before any trial.
    """
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"search space {where} must be a non-empty mapping of dotted config keys, "
                          "e.g. 'train.lr: {loguniform: [1.0e-5, 1.0e-3]}'")
    data = _fix_floats(data)
    space = {}
    for key, spec in data.items():
        key = str(key)
        _check_key(key, where)
        space[key] = _check_spec(key, spec, where)
    for key, (kind, args) in space.items():
        for value in args if kind in ("choice", "randint") else [float(a) for a in args]:  # what Tune samples
            try:
                trial_config(base or {}, {key: value})
            except ConfigError as e:
                raise ConfigError(f"search space {where}: {kind} value {value!r} for '{key}' is invalid: {e}") from None
    return space


def _read_space(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space '{path}' does not exist; pass a YAML file like tune/fusion_lr.yaml")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"search space '{path}' is not valid YAML: {e}") from None


def load_space(path: str | Path, base: dict | None = None) -> dict[str, tuple[str, list]]:
    """Read and validate a space YAML (see :func:`parse_space`)."""
    return parse_space(_read_space(path), base, where=f"'{path}'")


def tune_domains(space: dict[str, tuple[str, list]]) -> dict:
    """``{key: (kind, args)}`` -> Tune's ``param_space`` (randint's upper bound is inclusive here)."""
    from ray import tune

    make = {"choice": lambda a: tune.choice(a), "loguniform": lambda a: tune.loguniform(*a),
            "uniform": lambda a: tune.uniform(*a), "randint": lambda a: tune.randint(a[0], a[1] + 1)}
    return {key: make[kind](args) for key, (kind, args) in space.items()}


def trial_config(base: dict, params: dict) -> Config:
    """The raw config dict ``base`` with the sampled ``params`` (dotted keys) applied, validated."""
    data = _deepcopy(base)
    for key, value in params.items():
        _set(data, key, _plain(value))
    return config_from_dict(data)


# ----------------------------------------------------------------------------- resources
def per_trial_resources(base: dict, space: dict) -> dict[str, float]:
    """CPUs/GPUs one trial holds: its driver function + the Train workers (largest searched values)."""
    cfg = trial_config(base, {})

    def worst(key: str) -> float:
        if key not in space:
            return float(_get(cfg, key))
        return float(max(space[key][1]))

    workers = worst("train.num_workers")
    use_gpu = cfg.train.use_gpu or ("train.use_gpu" in space and True in space["train.use_gpu"][1])
    return {"CPU": TRIAL_CPUS + workers * worst("train.cpus_per_worker"),
            "GPU": workers * worst("train.gpus_per_worker") if use_gpu else 0.0,
            "data_CPU": worst("data.map_cpus")}


def max_concurrent_trials(need: dict[str, float], cluster: dict[str, float], requested: int | None = None) -> int:
    """How many trials may run at once without starving Ray Data.

    Every running trial holds ``need["CPU"]`` (driver + workers) for its whole run; its data tasks need
    ``need["data_CPU"]`` more, transiently. If the trials' holdings leave at least one data task's CPUs
    free, every pipeline makes progress; otherwise all trials wait on data forever (a silent hang).
    """
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    free = cpus - need["data_CPU"]
    safe = math.floor((free + 1e-9) / need["CPU"]) if need["CPU"] > 0 else 10**6
    if need["GPU"] > 0:
        safe = min(safe, math.floor((gpus + 1e-9) / need["GPU"]))
    if safe < 1:
        raise ConfigError(
            f"one trial needs {need['CPU']:g} CPUs ({TRIAL_CPUS:g} for its driver + train.num_workers x "
            f"train.cpus_per_worker) plus data.map_cpus={need['data_CPU']:g} for its data"
            + (f" and {need['GPU']:g} GPUs" if need["GPU"] else "")
            + f", but the cluster has {cpus:g} CPUs / {gpus:g} GPUs; lower train.num_workers or "
            "train.cpus_per_worker, or add nodes")
    if requested is None:
        return safe
    if requested < 1:
        raise ConfigError(f"--max-concurrent must be at least 1, got {requested}")
    if requested > safe:
        raise ConfigError(
            f"--max-concurrent {requested}: {requested} trials x {need['CPU']:g} CPUs"
            + (f" / {need['GPU']:g} GPUs" if need["GPU"] else "")
            + f" plus data.map_cpus={need['data_CPU']:g} exceed the cluster ({cpus:g} CPUs / {gpus:g} GPUs): "
            f"the data pipelines would starve and the sweep would hang; use at most {safe} or leave it out")
    return requested


# ----------------------------------------------------------------------------- one trial
# ASHA's decisions are carried out by the trial itself. Tune would otherwise kill the trial's actor, and
# the Train run inside dies ungracefully: its workers' placement group is freed only by Train's cleaner,
# which needs the dashboard (off here) and one Ray instance per machine. The leaked CPUs starve the next
# trials' data pipelines (seen: a sweep hung). So the scheduler writes DECISION for every result and
# returns CONTINUE; the trial's report callback waits for it and, on "stop", ends the Train run (the
# controller then shuts its workers down and frees their resources).
DECISION = "asha.json"
DECISION_WAIT_S = 60.0


class EarlyStopped(RuntimeError):
    """Raised in the Train controller to end a run that ASHA stopped."""


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _asha(sweep_dir: str, **kw):
    """Tune's ASHAScheduler whose STOP is recorded in ``trials/<id>/asha.json`` instead of enacted."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class GracefulASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            action = super().on_trial_result(tune_controller, trial, result)
            if "epoch" in result:
                _write_json(Path(sweep_dir) / "trials" / trial.trial_id / DECISION,
                            {"epoch": result["epoch"], "stop": action == TrialScheduler.STOP})
            return TrialScheduler.CONTINUE

    return GracefulASHA(**kw)


def _report_callback(metric: str, decision: Path | None):
    """A TuneReportCallback (runs in the Train controller) that forwards only the epochs carrying
    ``metric`` (Tune requires it in every result) and, with ASHA, obeys the decision on each one."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if not metrics or metric not in metrics[0]:
                return
            super().after_report(run_context, metrics, checkpoint)
            epoch, deadline = metrics[0].get("epoch"), time.time() + DECISION_WAIT_S
            while decision is not None and epoch is not None and time.time() < deadline:
                d = _read_json(decision)
                if d and d["epoch"] >= epoch:
                    if d["stop"]:
                        raise EarlyStopped(f"ASHA stopped this trial after epoch {epoch}")
                    return
                time.sleep(0.2)

    return ValReportCallback()


def train_trial(params: dict, *, base: dict, sweep_dir: str, metric: str, asha: bool = False) -> None:
    """Tune function trainable: one ``refseg train`` run in ``<sweep_dir>/trials/<trial_id>/``."""
    import ray.tune

    from refseg.train.driver import finish_training, make_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    out = Path(sweep_dir) / "trials" / trial_id
    cfg = trial_config(base, params)
    cfg.train.name = f"{cfg.train.name or 'trial'}-{trial_id}"  # unique under a shared storage_path
    if (out / "summary.json").is_file():  # trained before an interruption: replay the epochs to Tune
        for h in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()):
            if metric in h:
                ray.tune.report(h)
        return
    # a restarted trial (interrupted sweep, resumed error) continues its Train run from its checkpoint
    trainer, meta = make_trainer(cfg, out, resume=(out / "run.json").is_file(),
                                 callbacks=[_report_callback(metric, out / DECISION if asha else None)])
    try:
        result = trainer.fit()
    except Exception:
        if _stopped(out):
            return
        raise
    if result.error is not None and _stopped(out):
        return
    finish_training(result, meta)


def _stopped(trial_dir: Path) -> bool:
    return bool((_read_json(trial_dir / DECISION) or {}).get("stop"))


def _trial_dirname(trial) -> str:
    return trial.trial_id


# ----------------------------------------------------------------------------- the sweep
def _absolute_paths(base: dict) -> dict:
    """Tune trials run with another working directory: pin relative paths to this one."""
    from refseg.train.driver import absolutize

    raw, fixed = trial_config(base, {}), absolutize(trial_config(base, {}))
    base = _deepcopy(base)
    for key in PATH_KEYS:
        if _get(fixed, key) != _get(raw, key):
            _set(base, key, _get(fixed, key))
    return base


def _check_sweep(cfg: Config) -> None:
    t = cfg.tune
    if t.mode not in ("max", "min"):
        raise ConfigError(f"tune.mode must be 'max' or 'min', got {t.mode!r}")
    if t.scheduler not in ("asha", "none"):
        raise ConfigError(f"tune.scheduler must be 'asha' or 'none', got {t.scheduler!r}")
    if t.search not in ("random", "optuna"):
        raise ConfigError(f"tune.search must be 'random' or 'optuna', got {t.search!r}")
    if t.grace_period < 1:
        raise ConfigError(f"tune.grace_period must be at least 1 epoch, got {t.grace_period}")
    if t.metric.startswith("val_") and cfg.train.val_every < 1:
        raise ConfigError(f"tune.metric={t.metric} needs validation: set train.val_every to 1 (or more)")


def _tuner(trainable, space: dict, cfg: Config, state: dict):
    from ray import tune

    t = cfg.tune
    max_t = max(int(max(space["train.epochs"][1])) if "train.epochs" in space else 0, cfg.train.epochs)
    scheduler = None
    if t.scheduler == "asha":  # a trial that trained to max_t is done, not stopped
        scheduler = _asha(state["output_dir"], time_attr="epoch", grace_period=t.grace_period,
                          max_t=max(max_t, t.grace_period), stop_last_trials=False)
    # Tune ignores max_concurrent_trials for a BasicVariantGenerator instance: give it the limit itself
    limit = state["max_concurrent"]
    if t.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(seed=cfg.train.seed)
    else:
        from ray.tune.search import BasicVariantGenerator

        search, limit = BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=limit), None
    storage, name = state["experiment_path"].rstrip("/").rsplit("/", 1)  # a local path or a URI
    return tune.Tuner(
        trainable,
        param_space=tune_domains(space),
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, num_samples=state["num_samples"], scheduler=scheduler,
            search_alg=search, max_concurrent_trials=limit, reuse_actors=False,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


def _trainable(state: dict):
    """The trial function with its fixed arguments; it reserves only its own small CPU share, since
    the Train workers it launches are separate actors that reserve their own resources."""
    from ray import tune

    fn = tune.with_parameters(train_trial, base=state["base"], sweep_dir=state["output_dir"],
                              metric=state["metric"], asha=state["scheduler"] == "asha")
    return tune.with_resources(fn, {"CPU": TRIAL_CPUS})


def run_sweep(base: dict, space_data: Any, output_dir: str | Path, *, num_samples: int | None = None,
              max_concurrent: int | None = None, address: str | None = None, space_name: str = "<space>") -> dict:
    """Run a new sweep of ``space_data`` over the raw config ``base``; returns summary.json's dict."""
    from refseg.train.driver import init_ray

    t0 = time.time()
    out = Path(output_dir).expanduser().resolve()
    if (out / "sweep.json").exists():
        raise ConfigError(f"output dir '{out}' already holds a sweep; pass --resume {out} to continue it "
                          "or choose a new --output-dir")
    base = _absolute_paths(base)
    space = parse_space(space_data, base, where=space_name)
    cfg = trial_config(base, {})
    num_samples = cfg.tune.num_samples if num_samples is None else num_samples
    if num_samples < 1:
        raise ConfigError(f"--num-samples / tune.num_samples must be at least 1, got {num_samples}")
    _check_sweep(cfg)
    _prepare_env(cfg)
    init_ray(address)
    import ray

    need = per_trial_resources(base, space)
    concurrent = max_concurrent_trials(need, ray.cluster_resources(),
                                       max_concurrent if max_concurrent is not None else cfg.tune.max_concurrent)
    experiment = (f"{cfg.train.storage_path.rstrip('/')}/tune-{time.strftime('%Y%m%d-%H%M%S')}"
                  if cfg.train.storage_path else str(out / "tune"))
    state = {"base": base, "space": _fix_floats(space_data), "output_dir": str(out), "experiment_path": experiment,
             "metric": cfg.tune.metric, "mode": cfg.tune.mode, "num_samples": num_samples,
             "max_concurrent": concurrent, "per_trial": need, "scheduler": cfg.tune.scheduler}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(state, indent=1))
    log.warning("sweep: %d trials, at most %d at once (%g CPUs + %g GPUs each), outputs in %s",
                state["num_samples"], concurrent, need["CPU"], need["GPU"], out)
    tuner = _tuner(_trainable(state), space, cfg, state)
    tuner.fit()
    return write_sweep_outputs(out, state, wall_s=time.time() - t0)


def resume_sweep(output_dir: str | Path, *, address: str | None = None) -> dict:
    """Continue the sweep in ``output_dir``: unfinished and errored trials run, finished ones do not."""
    from ray import tune

    from refseg.train.driver import init_ray

    t0 = time.time()
    out = Path(output_dir).expanduser().resolve()
    if not (out / "sweep.json").is_file():
        raise ConfigError(f"--resume: '{out}' holds no sweep.json; start the sweep without --resume first")
    state = json.loads((out / "sweep.json").read_text())
    cfg = trial_config(state["base"], {})
    _prepare_env(cfg)
    init_ray(address)
    if not tune.Tuner.can_restore(state["experiment_path"]):
        raise ConfigError(f"--resume: no Tune experiment state at '{state['experiment_path']}' (the sweep "
                          "stopped before its first trial); delete the dir and start again")
    tuner = tune.Tuner.restore(state["experiment_path"], trainable=_trainable(state), resume_errored=True)
    tuner.fit()
    return write_sweep_outputs(out, state, wall_s=time.time() - t0)


def _prepare_env(cfg: Config) -> None:
    """What ``refseg train`` does before ray.init: the local cluster's workers inherit this env."""
    if not cfg.train.use_gpu and "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cpu"
    if cfg.data.synthetic and cfg.data.source == "refer":  # made once here, not raced by the trials
        from refseg.data import ensure_synthetic

        ensure_synthetic(cfg.data.root, cfg.data.synthetic_images, cfg.data.synthetic_seed)


# ----------------------------------------------------------------------------- outputs
def collect_trials(state: dict) -> list[dict]:
    """One record per trial from Tune's experiment state + the trial's own output dir."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(state["experiment_path"])
    frames = analysis.trial_dataframes
    records = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        tdir = Path(state["output_dir"]) / "trials" / trial.trial_id
        df = frames.get(trial.trial_id)
        history = []
        if df is not None and len(df) and "epoch" in df:
            cols = dict.fromkeys(("epoch", "val_oiou", "val_miou", state["metric"], "checkpoint_path"))
            keep = [c for c in cols if c in df]
            rows = df[keep].drop_duplicates("epoch", keep="last").sort_values("epoch")
            history = [{k: _plain(v) for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
                       for row in rows.to_dict("records")]
        error = None
        if trial.status == "ERROR":
            try:
                exc = trial.get_pickled_error()
                error = str(exc).strip().splitlines()[-1][:300] if exc is not None else "error"
            except Exception:  # noqa: BLE001 - the message is a nicety
                error = "error"
        status = {"ERROR": "error", "PENDING": "pending", "RUNNING": "interrupted", "PAUSED": "interrupted"}.get(
            trial.status)
        if status is None:  # TERMINATED: trained to the end, or stopped early by the scheduler
            status = "completed" if (tdir / "summary.json").is_file() or not _stopped(tdir) else "early_stopped"
        records.append({"trial_id": trial.trial_id, "params": {k: _plain(v) for k, v in trial.config.items()},
                        "status": status, "history": history, "error": error, "trial_dir": str(tdir)})
    return records


def _best_of(history: list[dict], metric: str, mode: str) -> dict | None:
    scored = [h for h in history if metric in h]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda h: h[metric])


def write_sweep_outputs(out: Path, state: dict, *, wall_s: float = 0.0, records: list[dict] | None = None) -> dict:
    """trials.csv, best.yaml, summary.json and trials.png in ``out``; returns the summary."""
    records = collect_trials(state) if records is None else records
    metric, mode = state["metric"], state["mode"]
    keys = list(state["space"])
    extra = [] if metric in ("val_oiou", "val_miou") else [metric]
    with open(out / "trials.csv.tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", *keys, "best_val_oiou", "best_val_miou", *[f"best_{m}" for m in extra],
                    "best_epoch", "epochs_run", "status", "error", "trial_dir"])
        for r in records:
            h, best = r["history"], _best_of(r["history"], metric, mode) or {}
            values = [json.dumps(v) if isinstance(v := r["params"].get(k), list) else v for k in keys]
            top = [max((x[m] for x in h if m in x), default=None) for m in ("val_oiou", "val_miou")]
            w.writerow([r["trial_id"], *values, *top, *[best.get(m) for m in extra], best.get("epoch"),
                        max((x["epoch"] for x in h), default=0), r["status"], r["error"] or "", r["trial_dir"]])
    os.replace(out / "trials.csv.tmp", out / "trials.csv")
    _plot_trials(records, metric, out / "trials.png")
    ranked = [(r, b) for r in records if (b := _best_of(r["history"], metric, mode)) is not None]
    summary: dict = {"metric": metric, "mode": mode, "num_trials": len(records),
                     "statuses": {s: sum(r["status"] == s for r in records) for s in
                                  sorted({r["status"] for r in records})},
                     "experiment_path": state["experiment_path"], "wall_s": round(wall_s, 1), "best": None}
    if ranked:
        r, b = (max if mode == "max" else min)(ranked, key=lambda rb: rb[1][metric])
        tdir = Path(r["trial_dir"])
        model = tdir / "model.pt"
        trial_summary = json.loads((tdir / "summary.json").read_text()) if (tdir / "summary.json").is_file() else {}
        cfg = trial_config(state["base"], r["params"])
        if (tdir / "config.yaml").is_file():  # what the trial really trained with (absolute paths, run name)
            cfg = config_from_dict(yaml.safe_load((tdir / "config.yaml").read_text()))
        cfg.save(out / "best.yaml")
        summary["best"] = {
            "trial_id": r["trial_id"], "params": r["params"], "status": r["status"], "value": b[metric],
            "epoch": b["epoch"], "val_oiou": b.get("val_oiou"), "val_miou": b.get("val_miou"),
            "trial_dir": str(tdir), "config": str(out / "best.yaml"),
            "model_path": str(model) if model.is_file() else None,
            "checkpoint_path": trial_summary.get("best_checkpoint") or b.get("checkpoint_path"),
        }
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / "summary.json")
    return summary


def _plot_trials(records: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in records:
        pts = [(h["epoch"], h[metric]) for h in r["history"] if metric in h]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{r['trial_id']} ({r['status']})")
    ax.set(xlabel="epoch", ylabel=metric.replace("val_", "val "), title=f"{metric} per trial")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if ax.lines:
        ax.legend(fontsize="small")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- CLI
def _space_path(name: str) -> str:
    p = Path(name)
    if p.is_file() or p.suffix in (".yaml", ".yml"):
        return str(p)
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / "tune" / f"{name}.yaml").is_file():
            return str(root / "tune" / f"{name}.yaml")
    raise ConfigError(f"search space '{name}' is neither a file nor a space shipped in tune/; pass a YAML path")


def cmd_tune(a: argparse.Namespace) -> int:
    from refseg.cli import _config_path
    from refseg.config import apply_overrides, load_yaml

    if a.resume:
        if a.config or a.space or a.overrides or a.num_samples is not None or a.max_concurrent is not None:
            raise ConfigError("--resume continues the sweep exactly as it started (its sweep.json); "
                              "drop --config, --space, --num-samples, --max-concurrent and overrides")
        summary = resume_sweep(a.resume, address=a.address)
    else:
        if not a.config:
            raise ConfigError("refseg tune needs --config CFG (or --resume DIR)")
        base = apply_overrides(load_yaml(_config_path(a.config)), a.overrides)
        space = a.space or trial_config(base, {}).tune.space
        if not space:
            raise ConfigError("no search space: pass --space tune/<name>.yaml or set tune.space in the config")
        path = _space_path(space)
        data = _read_space(path)
        out = a.output_dir or f"runs/tune-{Path(a.config).stem}-{Path(path).stem}"
        summary = run_sweep(base, data, out, num_samples=a.num_samples, max_concurrent=a.max_concurrent,
                            address=a.address, space_name=f"'{path}'")
    print(json.dumps(summary, indent=1))
    out = Path(a.resume or out).expanduser().resolve()
    statuses = summary["statuses"]
    if statuses.get("interrupted") or statuses.get("pending"):
        print(f"refseg: sweep interrupted; continue it with: refseg tune --resume {out}", file=sys.stderr)
        return 130
    return 1 if statuses and set(statuses) == {"error"} else 0


def add_verbs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="hyperparameter sweep: one Ray Train + DeepSpeed run per Tune trial (ASHA)",
                       epilog="outputs in DIR: trials.csv, best.yaml, summary.json, trials.png, trials/<id>/")
    p.add_argument("--config", help="YAML config path or a shipped name (debug, refcoco_r101)")
    p.add_argument("--space", help="search space YAML (tune/fusion_lr.yaml or its name); default tune.space")
    p.add_argument("--num-samples", type=int, help="trials to run (default tune.num_samples)")
    p.add_argument("--max-concurrent", type=int,
                   help="trials at once (default: as many as the cluster's CPUs/GPUs fit without starving data)")
    p.add_argument("--output-dir", help="sweep directory (default runs/tune-<config>-<space>)")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted sweep in DIR")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a fresh local instance)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides for every trial")
    p.set_defaults(fn=cmd_tune)
