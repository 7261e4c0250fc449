"""Start or resume a sweep: the Tuner over :func:`refseg.sweep.trial.train_trial`, sized to the cluster.

    summary = run_sweep(base, space_data, "runs/sweep", num_samples=8)   # base: the raw config dict
    summary = resume_sweep("runs/sweep")     # unfinished and errored trials run again, finished ones do not
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from refseg.config import Config, ConfigError, deep_copy, fix_floats
from refseg.config.validate import validate_sweep
from refseg.runtime import init_ray, verbose
from refseg.sweep.outputs import SWEEP_FILE, SweepState, write_sweep_outputs
from refseg.sweep.space import (
    TRIAL_CPUS,
    get_key,
    max_concurrent_trials,
    parse_space,
    per_trial_resources,
    set_key,
    trial_config,
    tune_domains,
)
from refseg.sweep.trial import graceful_asha, train_trial, trial_dirname
from refseg.train.tracking import check_trackers

log = logging.getLogger("refseg.tune")

SWEEP_EXPERIMENT = "refseg-sweep"
PATH_KEYS = ("data.root", "data.image_dir", "data.parquet", "data.manifest", "train.storage_path",
             "deepspeed.config_file", "model.text.encoder", "model.text.tokenizer", "model.vision.weights")


def _absolute_paths(base: dict) -> dict:
    """Tune trials run with another working directory: pin relative paths to this one."""
    from refseg.train.driver import absolutize

    raw, fixed = trial_config(base, {}), absolutize(trial_config(base, {}))
    base = deep_copy(base)
    for key in PATH_KEYS:
        if get_key(fixed, key) != get_key(raw, key):
            set_key(base, key, get_key(fixed, key))
    return base


def make_tuner(trainable: Any, space: dict, cfg: Config, state: SweepState) -> Any:
    """The ``tune.Tuner`` of a new sweep: ``cfg.tune``'s scheduler and search on ``state.metric`` (the
    resolved ``tune.metric``), at most ``state.max_concurrent`` trials at once, trial dirs named by trial id."""
    from ray import tune

    t = cfg.tune
    max_t = max(int(max(space["train.epochs"][1])) if "train.epochs" in space else 0, cfg.train.epochs)
    scheduler = None
    if t.scheduler == "asha":  # a trial that trained to max_t is done, not stopped
        scheduler = graceful_asha(state.output_dir, time_attr="epoch", grace_period=t.grace_period,
                                  max_t=max(max_t, t.grace_period), stop_last_trials=False)
    # Tune ignores max_concurrent_trials for a BasicVariantGenerator instance: give it the limit itself
    limit = state.max_concurrent
    if t.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(seed=cfg.train.seed)
    else:
        from ray.tune.search import BasicVariantGenerator

        search, limit = BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=limit), None
    storage, name = state.experiment_path.rstrip("/").rsplit("/", 1)  # a local path or a URI
    return tune.Tuner(
        trainable,
        param_space=tune_domains(space),
        tune_config=tune.TuneConfig(
            metric=state.metric, mode=t.mode, num_samples=state.num_samples, scheduler=scheduler,
            search_alg=search, max_concurrent_trials=limit, reuse_actors=False,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1 if verbose() else 0,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=tracking_callbacks(cfg, state.output_dir)),
    )


def tracking_callbacks(cfg: Config, sweep_dir: str) -> list:
    """Ray Tune's logger callbacks for ``train.tracking``, comparing the trials in one place: for mlflow the
    experiment ``refseg-sweep`` (one run per trial: its sampled parameters, each validated epoch it
    reported) in ``train.tracking_uri`` or ``DIR/mlflow``; for wandb one group named after DIR. Each
    trial's Train run also logs itself like ``refseg train`` does (per step, per epoch, curves, model)
    into ``DIR/trials/<id>/``: ``tensorboard --logdir DIR/trials`` shows every trial."""
    callbacks = []
    if "mlflow" in cfg.train.tracking:
        from mlflow import MlflowClient
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        from refseg.train.tracking import mlflow_experiment, mlflow_location, quiet_tracker_logs

        quiet_tracker_logs()
        uri, artifacts = mlflow_location(cfg, sweep_dir)
        mlflow_experiment(MlflowClient(tracking_uri=uri), SWEEP_EXPERIMENT, artifacts)  # artifacts under DIR
        callbacks.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=SWEEP_EXPERIMENT,
                                              tags={"refseg.sweep": sweep_dir}))
    if "wandb" in cfg.train.tracking:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project="refseg", group=Path(sweep_dir).name))
    return callbacks


def _trainable(state: SweepState) -> Any:
    """The trial function with its fixed arguments; it reserves only its own small CPU share, since
    the Train workers it launches are separate actors that reserve their own resources."""
    from ray import tune

    fn = tune.with_parameters(train_trial, base=state.base, sweep_dir=state.output_dir,
                              metric=state.metric, asha=state.scheduler == "asha")
    return tune.with_resources(fn, {"CPU": TRIAL_CPUS})


def _start(cfg: Config, address: str | None) -> dict[str, float]:
    """What every sweep does before its Tuner runs: the training runs' environment, then Ray;
    returns the cluster's resources."""
    import ray

    from refseg.train.driver import prepare_environment

    prepare_environment(cfg)
    init_ray(address)
    return ray.cluster_resources()


def run_sweep(base: dict, space_data: Any, output_dir: str | Path, *, num_samples: int | None = None,
              max_concurrent: int | None = None, address: str | None = None, space_name: str = "<space>") -> dict:
    """Run a new sweep of ``space_data`` over the raw config ``base``; returns summary.json's dict."""
    t0 = time.time()
    out = Path(output_dir).expanduser().resolve()
    if (out / SWEEP_FILE).exists():
        raise ConfigError(f"output dir '{out}' already holds a sweep; pass --resume {out} to continue it "
                          "or choose a new --output-dir")
    base = _absolute_paths(base)
    space = parse_space(space_data, base, where=space_name)
    cfg = trial_config(base, {})
    num_samples = cfg.tune.num_samples if num_samples is None else num_samples
    if num_samples < 1:
        raise ConfigError(f"--num-samples / tune.num_samples must be at least 1, got {num_samples}")
    validate_sweep(cfg)
    check_trackers(cfg.train.tracking)
    cluster = _start(cfg, address)
    need = per_trial_resources(base, space)
    concurrent = max_concurrent_trials(need, cluster,
                                       max_concurrent if max_concurrent is not None else cfg.tune.max_concurrent)
    experiment = (f"{cfg.train.storage_path.rstrip('/')}/tune-{time.strftime('%Y%m%d-%H%M%S')}"
                  if cfg.train.storage_path else str(out / "tune"))
    state = SweepState(base=base, space=fix_floats(space_data), output_dir=str(out), experiment_path=experiment,
                       metric=cfg.tune_metric(), mode=cfg.tune.mode, num_samples=num_samples,
                       max_concurrent=concurrent, per_trial=need, scheduler=cfg.tune.scheduler)
    out.mkdir(parents=True, exist_ok=True)
    state.save()
    log.warning("sweep: %d trials, at most %d at once (%g CPUs + %g GPUs each), outputs in %s",
                state.num_samples, concurrent, need["CPU"], need["GPU"], out)
    make_tuner(_trainable(state), space, cfg, state).fit()
    return write_sweep_outputs(out, state, wall_s=time.time() - t0)


def resume_sweep(output_dir: str | Path, *, address: str | None = None) -> dict:
    """Continue the sweep in ``output_dir``: unfinished and errored trials run, finished ones do not."""
    from ray import tune

    t0 = time.time()
    out = Path(output_dir).expanduser().resolve()
    if not (out / SWEEP_FILE).is_file():
        raise ConfigError(f"--resume: '{out}' holds no sweep.json; start the sweep without --resume first")
    state = SweepState.load(out)
    _start(trial_config(state.base, {}), address)
    if not tune.Tuner.can_restore(state.experiment_path):
        raise ConfigError(f"--resume: no Tune experiment state at '{state.experiment_path}' (the sweep "
                          "stopped before its first trial); delete the dir and start again")
    tuner = tune.Tuner.restore(state.experiment_path, trainable=_trainable(state), resume_errored=True)
    tuner.fit()
    return write_sweep_outputs(out, state, wall_s=time.time() - t0)
