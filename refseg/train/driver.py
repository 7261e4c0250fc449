"""The training driver: config -> Ray Data datasets -> TorchTrainer(DeepSpeed) -> outputs.

    summary = run_training(cfg, output_dir)          # what `refseg train` and jobs/train.py call

Outputs in ``output_dir``: config.yaml, run.json (Ray run name + storage, for --resume),
metrics.jsonl, curves.png, model.pt (consolidated fp32 + resolved config), summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from refseg import raylog
from refseg.config import Config, ConfigError
from refseg.train.ds_config import check_precision
from refseg.train.report import write_outputs

log = logging.getLogger("refseg.train")


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
    t = cfg.model.text
    if t.bert_config is None and Path(t.encoder).expanduser().exists():
        t.encoder = fix(t.encoder)
    if t.tokenizer and Path(t.tokenizer).expanduser().exists():
        t.tokenizer = fix(t.tokenizer)
    w = cfg.model.vision.weights
    if w and Path(w).expanduser().exists():
        cfg.model.vision.weights = fix(w)
    return cfg


def extensions_env() -> dict[str, str]:
    """{TORCH_EXTENSIONS_DIR: <venv>/torch_extensions} unless the user set it or the venv is read-only.

    DeepSpeed JIT-builds its CPU communication op there on first use (1-2 min); the default
    ~/.cache/torch_extensions is shared by every venv, so two venvs (another checkout, CI) rebuild it
    back and forth and a run pays the build inside its wall time."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return {"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}
    path = os.path.join(sys.prefix, "torch_extensions")
    return {"TORCH_EXTENSIONS_DIR": path} if os.access(sys.prefix, os.W_OK) else {}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` / $RAY_ADDRESS when given, else start a fresh local instance."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # A rank blocked in a CPU collective can stall Ray Train's health check of the group for
        # its 10-minute default after a peer dies; on a local instance, notice within 90 s.
        extensions = extensions_env()
        os.environ.update(extensions)  # --local trains in this process
        env = {"RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S", "90"),
               **extensions, **raylog.worker_env()}
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": env, "worker_process_setup_hook": "refseg.raylog.quiet_worker"})


def check_resources(cfg: Config, local: bool) -> None:
    """Refuse configs that would leave Ray Data without CPUs (a silent hang otherwise)."""
    import ray

    if local:
        return
    total = ray.cluster_resources().get("CPU", 0.0)
    need = cfg.train.num_workers * cfg.train.cpus_per_worker
    if need + cfg.data.map_cpus > total + 1e-9:
        raise ConfigError(
            f"train.num_workers={cfg.train.num_workers} x train.cpus_per_worker={cfg.train.cpus_per_worker} "
            f"plus data.map_cpus={cfg.data.map_cpus} needs {need + cfg.data.map_cpus:g} CPUs but the cluster "
            f"has {total:g}: the data pipeline would starve and the run would hang; lower "
            "train.cpus_per_worker or train.num_workers, or add nodes"
        )
    if cfg.train.use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if cfg.train.num_workers * cfg.train.gpus_per_worker > gpus + 1e-9:
            raise ConfigError(
                f"train.use_gpu=true with {cfg.train.num_workers} workers x {cfg.train.gpus_per_worker} GPU "
                f"but the cluster has {gpus:g} GPUs; lower train.num_workers or set train.use_gpu=false"
            )


def check_model(cfg: Config) -> None:
    """Model-layout errors (fusion.level, dim vs heads, decoder stages, ...) and a tokenizer / pretrained
    text encoder that is neither local, cached nor downloadable as one ConfigError sentence from the
    driver, before any Ray work -- not as a traceback (or minutes of download retries) from every worker."""
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


def check_schedule(cfg: Config) -> None:
    """train.epochs / train.time_budget_s that cannot make a schedule, as one sentence before Ray starts."""
    if cfg.train.epochs < 1:
        raise ConfigError(f"train.epochs must be at least 1, got {cfg.train.epochs}")
    budget = cfg.train.time_budget_s
    if budget is not None and not (budget > 0 and math.isfinite(budget)):
        raise ConfigError(f"train.time_budget_s must be a positive number of seconds (or null for no budget), "
                          f"got {budget}")


def check_augmentation(cfg: Config) -> None:
    """data.min_scale / data.hflip_prob out of range as one sentence before Ray starts (the data
    pipeline raises the same sentence, but only after Ray and the output dir exist)."""
    from refseg.data.errors import RefSegDataError
    from refseg.data.ray_data import sample_opts

    try:
        sample_opts(cfg.data, train=True)
    except RefSegDataError as e:
        raise ConfigError(str(e)) from None


def build_datasets(cfg: Config, world: int) -> tuple[dict, int]:
    """{"train": refs dataset, "val_<rank>": that rank's share of every val sentence}; train rows."""
    from refseg.data import build_dataset, count_refs

    data = cfg.data
    # data.cache: the decoded rows; every worker keeps its shard and samples it (refseg.data.cache.ShardCache)
    datasets = {"train": build_dataset(data, data.train_split, train=True, tokenizer_source=cfg.model.text,
                                       cache_rows=data.cache)}
    train_rows = count_refs(data, data.train_split)
    if cfg.train.val_every:
        # validation always pairs images with their own expressions, also in the shuffled control run
        val_data = dataclasses.replace(data, shuffle_expressions=False)
        for r in range(world):
            datasets[f"val_{r}"] = build_dataset(
                val_data, data.val_split, train=False, tokenizer_source=cfg.model.text, shard=(r, world)
            )
    return datasets, train_rows


def steps_per_epoch(train_rows: int, cfg: Config, world: int) -> int:
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


def local_env() -> None:
    """A one-rank process group's env vars for this process (Ray Train local mode, bench/gpu.py)."""
    import socket

    if os.environ.get("MASTER_PORT"):
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )


def run_training(
    cfg: Config,
    output_dir: str | Path,
    *,
    resume: bool = False,
    local: bool = False,
    address: str | None = None,
    probe_path: str | None = None,
) -> dict:
    """Train ``cfg`` and write every output into ``output_dir``; returns the summary dict."""
    trainer, meta = make_trainer(cfg, output_dir, resume=resume, local=local, address=address,
                                 probe_path=probe_path)
    return finish_training(trainer.fit(), meta)


def make_trainer(
    cfg: Config,
    output_dir: str | Path,
    *,
    resume: bool = False,
    local: bool = False,
    address: str | None = None,
    probe_path: str | None = None,
    callbacks: list | None = None,
):
    """Everything ``run_training`` does before ``fit()``; returns (TorchTrainer, meta for finish_training).

    ``callbacks``: Ray Train ``UserCallback``s for the RunConfig (a Tune trial passes TuneReportCallback)."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from refseg.train.loop import train_loop_per_worker

    t0 = time.time()
    check_precision(cfg.train.precision, cuda=cfg.train.use_gpu)  # fail before any Ray work
    check_model(cfg)
    check_schedule(cfg)
    check_augmentation(cfg)
    out = Path(output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = absolutize(cfg)
    run_file = out / "run.json"
    if resume:
        if not run_file.is_file():
            raise ConfigError(f"--resume: '{out}' holds no run.json; start the run without --resume first")
        run = json.loads(run_file.read_text())
    else:
        if (out / "summary.json").exists() or run_file.exists():
            raise ConfigError(
                f"output dir '{out}' already holds a run; pass --resume to continue it or choose a new --output-dir"
            )
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run = {
            "name": cfg.train.name or f"refseg-{stamp}",
            "storage_path": cfg.train.storage_path or str(out / "ray"),
        }
    cfg.save(out / "config.yaml")
    world = 1 if local else cfg.train.num_workers
    if not cfg.train.use_gpu and "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cpu"
    if cfg.data.synthetic and cfg.data.source == "refer":
        from refseg.data import ensure_synthetic

        ensure_synthetic(cfg.data.root, cfg.data.synthetic_images, cfg.data.synthetic_seed)
    init_ray(address)
    check_resources(cfg, local)
    raylog.quiet_data()
    datasets, train_rows = build_datasets(cfg, world)
    spe = steps_per_epoch(train_rows, cfg, world)
    loop_config = {"config": cfg.to_dict(), "output_dir": str(out), "steps_per_epoch": spe, "local": local,
                   "probe_path": probe_path, "t0": t0}
    if local:
        local_env()
        ckpts = sorted((out / "checkpoints").glob("epoch_*")) if resume else []
        if ckpts:
            loop_config["resume_from"] = str(ckpts[-1])
    run_file.write_text(json.dumps(run, indent=1))

    cuda = cfg.train.use_gpu
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cuda:
        resources["GPU"] = cfg.train.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=0 if local else cfg.train.num_workers, use_gpu=cuda,
            resources_per_worker=None if local else resources,
        ),
        run_config=RunConfig(
            name=run["name"],
            storage_path=run["storage_path"],
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=max(1, cfg.train.keep_checkpoints),
                checkpoint_score_attribute="val_oiou" if cfg.train.val_every else None,
                checkpoint_score_order="max",
            ),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level=raylog.train_log_level()),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
    )
    return trainer, {"cfg": cfg, "out": out, "local": local, "steps_per_epoch": spe, "t0": t0}


def finish_training(result, meta: dict) -> dict:
    """After ``fit()``: raise the run's error, else write every output (report.write_outputs)."""
    if result.error is not None:
        raise result.error
    return write_outputs(meta["cfg"], meta["out"], result, local=meta["local"],
                         steps_per_epoch=meta["steps_per_epoch"], wall_s=time.time() - meta["t0"])
