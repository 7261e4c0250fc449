"""The training driver: config -> Ray Data datasets -> TorchTrainer(DeepSpeed) -> outputs.

    summary = run_training(cfg, output_dir)          # what `refseg train` and jobs/train.py call

Outputs in ``output_dir``: config.yaml, run.json (Ray run name + storage, for --resume),
metrics.jsonl, curves.png, model.pt (consolidated fp32 + resolved config), summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from datetime import datetime
from pathlib import Path

from refseg import runtime
from refseg.config import Config, ConfigError
from refseg.config.schema import GENERALIZED_DATASETS
from refseg.config.validate import validate
from refseg.data.sources.refer import check_data_root
from refseg.io import check_output_dir, write_text_atomic
from refseg.runtime import init_ray, local_env
from refseg.train.checkpoint import check_resume, local_checkpoints, score_key
from refseg.train.outputs import write_outputs
from refseg.train.stop import StopRequest, TrainingStopped
from refseg.train.tracking import check_trackers


def absolutize(cfg: Config) -> Config:
    """Train V2 workers chdir into a per-run dir: make every local path absolute before fit()."""

    def fix(p: str | None) -> str | None:
        if p is None or "://" in p:
            return p
        return str(Path(p).expanduser().resolve())

    d = cfg.data
    d.root, d.image_dir, d.parquet, d.manifest = fix(d.root), fix(d.image_dir), fix(d.parquet), fix(d.manifest)
    cfg.train.storage_path = fix(cfg.train.storage_path)
    cfg.deepspeed.config_file = fix(cfg.deepspeed.config_file)
    cfg.train.init_from = fix(cfg.train.init_from)
    t = cfg.model.text
    if t.bert_config is None and Path(t.encoder).expanduser().exists():
        t.encoder = fix(t.encoder)
    if t.tokenizer and Path(t.tokenizer).expanduser().exists():
        t.tokenizer = fix(t.tokenizer)
    w = cfg.model.vision.weights
    if w and Path(w).expanduser().exists():
        cfg.model.vision.weights = fix(w)
    return cfg


def check_resources(cfg: Config, local: bool) -> None:
    """Refuse configs that would leave Ray Data without CPUs (a silent hang otherwise)."""
    import ray

    if local:
        return
    total = ray.cluster_resources().get("CPU", 0.0)
    workers = cfg.train.worker_range()[0]  # elastic: the run starts with what the cluster holds, at least min
    need = workers * cfg.train.cpus_per_worker
    if need + cfg.data.map_cpus > total + 1e-9:
        raise ConfigError(
            f"{workers} worker(s) of train.num_workers={cfg.train.num_workers} x train.cpus_per_worker="
            f"{cfg.train.cpus_per_worker} "
            f"plus data.map_cpus={cfg.data.map_cpus} needs {need + cfg.data.map_cpus:g} CPUs but the cluster "
            f"has {total:g}: the data pipeline would starve and the run would hang; lower "
            "train.cpus_per_worker or train.num_workers, or add nodes"
        )
    if cfg.train.use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if workers * cfg.train.gpus_per_worker > gpus + 1e-9:
            raise ConfigError(
                f"train.use_gpu=true with {workers} workers x {cfg.train.gpus_per_worker} GPU "
                f"but the cluster has {gpus:g} GPUs; lower train.num_workers or set train.use_gpu=false"
            )


def check_model(cfg: Config) -> None:
    """The model checks that need torch or the hub (backbone, norm, widths, weights names; a tokenizer /
    pretrained text encoder that is neither local, cached nor downloadable) as one ConfigError sentence
    from the driver, before any Ray work -- not as a traceback (or minutes of download retries) from
    every worker. The layout arithmetic is :func:`refseg.config.validate.validate_model`'s."""
    from refseg.models.refseg_model import check_architecture
    from refseg.models.text import check_text_sources

    try:
        check_architecture(cfg.model)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    try:
        check_text_sources(cfg.model.text)  # the tokenizer / pretrained BERT: local, cached or reachable
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_datasets(cfg: Config, world: int) -> tuple[dict, int]:
    """{"train": refs dataset, "val_<rank>": that rank's share of every val sentence}; train rows."""
    from refseg.data import build_dataset, count_refs, tokenizer_spec
    from refseg.models import load_tokenizer

    data = cfg.data
    tokenizer = tokenizer_spec(load_tokenizer(cfg.model.text))  # loaded once, sent to the workers
    # data.cache: the decoded rows; every worker keeps its shard and samples it (refseg.data.cache.ShardCache)
    datasets = {"train": build_dataset(data, data.train_split, train=True, tokenizer=tokenizer,
                                       cache_rows=data.cache)}
    train_rows = count_refs(data, data.train_split)
    if cfg.train.val_every:
        # validation always pairs images with their own expressions, also in the shuffled control run
        val_data = dataclasses.replace(data, shuffle_expressions=False)
        for r in range(world):
            datasets[f"val_{r}"] = build_dataset(
                val_data, data.val_split, train=False, tokenizer=tokenizer, shard=(r, world)
            )
    return datasets, train_rows


def steps_per_epoch(train_rows: int, cfg: Config, world: int) -> int:
    """Optimizer steps per epoch at ``world`` workers: the same at any size of an elastic run, whose
    global batch stays ``batch_size x max workers x grad_accum`` (refseg.train.engine.accumulation)."""
    per_rank = train_rows // world  # streaming_split(equal=True) gives every rank the same rows
    steps = per_rank // (cfg.train.batch_size * cfg.train.grad_accum)
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    if steps < 1:
        raise ConfigError(
            f"the train split has {train_rows} refs: fewer than one step of {world} worker(s) x "
            f"train.batch_size={cfg.train.batch_size} x train.grad_accum={cfg.train.grad_accum}; "
            "lower the batch size or use more data"
        )
    return steps


def check_config(cfg: Config) -> None:
    """Every error ``cfg`` can cause in the workers, as one ConfigError sentence before any Ray work:
    its values (:func:`refseg.config.validate.validate`), then what needs torch or the hub."""
    validate(cfg)
    check_model(cfg)
    check_trackers(cfg.train.tracking)  # their packages installed


def prepare_environment(cfg: Config) -> None:
    """What a training run (or a sweep of them) sets up before ``ray.init``: DeepSpeed's CPU accelerator
    for CPU runs (a local cluster's workers inherit the variable) and the synthetic set, made once here
    rather than raced by the workers (or trials)."""
    if not cfg.train.use_gpu and "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cpu"
    if cfg.data.synthetic and cfg.data.source == "refer":
        from refseg.data import ensure_generalized_synthetic, ensure_synthetic

        make = ensure_generalized_synthetic if cfg.data.dataset in GENERALIZED_DATASETS else ensure_synthetic
        make(cfg.data.root, cfg.data.synthetic_images, cfg.data.synthetic_seed)


@dataclasses.dataclass
class PreparedRun:
    """What ``finish_training`` needs from ``make_trainer``: the resolved config, the output dir, local
    mode, the optimizer steps per epoch and when the run (or this resume) started (``time.time()``)."""

    cfg: Config
    out: Path
    local: bool
    steps_per_epoch: int
    t0: float


def run_training(cfg: Config, output_dir: str | Path, *, resume: bool = False, local: bool = False,
                 address: str | None = None) -> dict:
    """Train ``cfg`` and write every output into ``output_dir``; returns the summary dict.

    SIGINT / SIGTERM during training stop every worker after the same step with a checkpoint
    (:mod:`refseg.train.stop`): the outputs are written for the epochs that ran and
    :class:`~refseg.train.stop.TrainingStopped` (a KeyboardInterrupt) is raised with the summary, whose
    ``"interrupted"`` says where; ``resume=True`` continues from there. ``resume`` on a dir without a run
    or a checkpoint raises ConfigError first."""
    if resume:
        check_resume(output_dir, local)  # before any Ray work or file
    stop = StopRequest(local)
    trainer, run = make_trainer(cfg, output_dir, resume=resume, local=local, address=address, stop=stop.name)
    with stop:
        result = stop.run(trainer.fit)
    summary = finish_training(result, run, stopped_by=stop.signum)
    if "interrupted" in summary:
        raise TrainingStopped(stop.signum, summary)
    return summary


def open_run(cfg: Config, out: Path, resume: bool) -> dict:
    """{"name", "storage_path"} of the Ray Train run in ``out``: read from its run.json for ``resume``,
    else new (refusing a dir that holds a run already)."""
    run_file = out / "run.json"
    if resume:
        if not run_file.is_file():
            raise ConfigError(f"--resume: '{out}' holds no run.json; start the run without --resume first")
        return json.loads(run_file.read_text())
    if (out / "summary.json").exists() or run_file.exists():
        raise ConfigError(
            f"output dir '{out}' already holds a run; pass --resume to continue it or choose a new --output-dir"
        )
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return {"name": cfg.train.name or f"refseg-{stamp}", "storage_path": cfg.train.storage_path or str(out / "ray")}


def make_trainer(
    cfg: Config,
    output_dir: str | Path,
    *,
    resume: bool = False,
    local: bool = False,
    address: str | None = None,
    callbacks: list | None = None,
    stop: str | None = None,
):
    """Everything ``run_training`` does before ``fit()``; returns (TorchTrainer, PreparedRun).

    ``callbacks``: Ray Train ``UserCallback``s for the RunConfig (a Tune trial passes TuneReportCallback);
    ``stop``: the name of the :class:`refseg.train.stop.StopRequest` the workers watch."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from refseg.train.init import check_init
    from refseg.train.loop import LoopConfig, train_loop_per_worker

    t0 = time.time()
    check_config(cfg)  # fail before any Ray work or file
    cfg = absolutize(cfg)
    mismatch = None if resume else check_init(cfg)  # train.init_from: readable, and fits unless non-strict
    if mismatch:
        print(f"[refseg] {mismatch}", flush=True)
    check_output_dir(output_dir, "--output-dir")
    if cfg.data.source == "refer" and not cfg.data.synthetic:
        check_data_root(cfg.data.root, cfg.data.dataset, cfg.data.split_by, cfg.data.image_dir)
    out = Path(output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = open_run(cfg, out, resume)
    write_text_atomic(out / "config.yaml", cfg.to_yaml())
    # --local trains in one process: the workers' config says so, or their elastic accumulation (which
    # reads train.num_workers) would scale its global batch up to the config's worker count
    worker_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=1)) if local else cfg
    world = worker_cfg.train.worker_range()[1]  # elastic: val shards and steps as at the most
    prepare_environment(cfg)
    init_ray(address)
    check_resources(cfg, local)
    runtime.quiet_data()  # also when Ray was up before (jobs/train.py): init_ray then returns at once
    datasets, train_rows = build_datasets(cfg, world)
    spe = steps_per_epoch(train_rows, cfg, world)
    loop = LoopConfig(config=worker_cfg.to_dict(), output_dir=str(out), steps_per_epoch=spe, t0=t0, local=local,
                      stop=stop, val_shards=world)
    if local:
        local_env()
        ckpts = local_checkpoints(out) if resume else []
        if ckpts:
            loop.resume_from = str(ckpts[-1])
    (out / "run.json").write_text(json.dumps(run, indent=1))

    cuda = cfg.train.use_gpu
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cuda:
        resources["GPU"] = cfg.train.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dataclasses.asdict(loop),
        scaling_config=scaling_config(cfg, local, resources),
        run_config=RunConfig(
            name=run["name"],
            storage_path=run["storage_path"],
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=max(1, cfg.train.keep_checkpoints),
                checkpoint_score_attribute=score_key(cfg) if cfg.train.val_every else None,
                checkpoint_score_order="max",
            ),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level=runtime.train_log_level()),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
    )
    return trainer, PreparedRun(cfg, out, local, spe, t0)


def scaling_config(cfg: Config, local: bool, resources: dict):
    """Ray Train's ScalingConfig: local mode (0 workers), a fixed count, or elastic between
    ``train.num_workers``' [min, max] (Ray Train then restarts the group from the latest checkpoint at
    the size the cluster holds, checking every ``train.elastic_resize_monitor_interval_s`` for room to
    grow; refseg.train.reshard restores the ZeRO state at the new size)."""
    from ray.train import ScalingConfig

    if local:
        return ScalingConfig(num_workers=0, use_gpu=cfg.train.use_gpu)
    low, high = cfg.train.worker_range()
    return ScalingConfig(num_workers=(low, high) if low < high else high, use_gpu=cfg.train.use_gpu,
                         resources_per_worker=resources,
                         elastic_resize_monitor_interval_s=cfg.train.elastic_resize_monitor_interval_s)


def finish_training(result, run: PreparedRun, stopped_by: int = 0) -> dict:
    """After ``fit()``: raise the run's error, else write every output (outputs.write_outputs);
    ``stopped_by``: the signal that stopped the run (0: none)."""
    if result.error is not None:
        raise result.error
    return write_outputs(run.cfg, run.out, result, local=run.local, steps_per_epoch=run.steps_per_epoch,
                         wall_s=time.time() - run.t0, stopped_by=stopped_by)
