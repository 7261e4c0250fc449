"""The per-worker training loop (runs inside each Ray Train worker, or in the driver with --local).

Small helpers in the style of Ray's DeepSpeed example: set up the engine, train one epoch,
validate, save + report a checkpoint, restore. The driver (``driver.py``) owns Ray and paths.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refseg.config import Config, TrainConfig, config_from_dict
from refseg.data.cache import KeptBatches
from refseg.losses import refseg_loss
from refseg.metrics import SegMetrics
from refseg.train.ds_config import build_deepspeed_config, lr_lambda
from refseg.train.report import CKPT_TAG, STATE_FILE

log = logging.getLogger("refseg.train")
VAL_KEEP_BYTES = 2**29  # decoded val batches a worker keeps in memory to replay (larger val shards stream)
BUDGET_TIMED_EPOCHS = 3  # train.time_budget_s: epochs timed in this process (after its first) before fitting
BUDGET_WINDOW = 8  # epochs whose mean time a re-fit uses (the latest; start-up effects drop out)
BUDGET_MARGIN = 0.03  # share of train.time_budget_s kept free for the export after the last epoch


def say(message: str) -> None:
    """One progress line on the worker's stdout (Ray forwards it to the driver once).

    Not ``print``: Ray Train V2 patches ``print`` in its workers to log *and* echo, which doubles
    every line on the driver's console."""
    sys.stdout.write(f"[refseg] {message}\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- setup
def pick_device(use_gpu: bool) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup_engine(cfg: Config, total_steps: int, device: torch.device):
    """Build the model, AdamW (two LR groups), warmup+poly schedule and the DeepSpeed engine."""
    import deepspeed

    from refseg.models import build_model

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, pretrained=True)
    groups = model.param_groups(cfg.train.lr, cfg.train.encoder_lr_mult, cfg.train.weight_decay)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.999), fused=fused)
    warmup = cfg.train.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup, cfg.train.poly_power)
    )
    ds_config = build_deepspeed_config(cfg.train, cfg.deepspeed, cuda=device.type == "cuda")
    if cfg.train.precision == "bf16":
        # DeepSpeed casts parameters only; BatchNorm's fp32 running stats then fail on CPU
        # ("expected scalar type BFloat16"). Cast the whole module (buffers included) up front:
        # the fp32 master weights DeepSpeed keeps start from the same values.
        model = model.to(torch.bfloat16)
    # No channels_last weights: DeepSpeed broadcasts each parameter as a byte view (fails on a
    # non-unit last stride, seen on an H200) and ZeRO re-points parameters into flat contiguous
    # buffers anyway. The input batch is channels_last on CUDA instead (to_inputs).
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if cfg.train.compile:
        engine.compile()  # nn.Module.compile in place: checkpoints keep their parameter names
    return engine, scheduler


def engine_dtype(cfg: Config) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)


def to_inputs(batch: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Ray Data numpy/torch batch -> (image (B,3,S,S), ids (B,L), attn (B,L), mask (B,S,S))."""
    image = torch.as_tensor(batch["image"]).to(device, dtype=dtype, non_blocking=True)
    if device.type == "cuda":  # NHWC activations for cuDNN's bf16 convolutions (bench/gpu.py measures it)
        image = image.contiguous(memory_format=torch.channels_last)
    ids = torch.as_tensor(batch["input_ids"]).to(device, dtype=torch.long, non_blocking=True)
    attn = torch.as_tensor(batch["attention_mask"]).to(device, dtype=torch.long, non_blocking=True)
    mask = torch.as_tensor(batch["mask"]).to(device, dtype=torch.float32, non_blocking=True)
    return image, ids, attn, mask


# ----------------------------------------------------------------------------- steps
def epoch_actions(epoch: int, train: TrainConfig) -> tuple[bool, bool]:
    """(validate, checkpoint) after 1-based ``epoch``: checkpoints every ``checkpoint_every`` epochs and
    at the last; validation every ``val_every`` epochs, at the last, and at every checkpoint (its val_oiou
    ranks it among the kept checkpoints), never with ``val_every=0``."""
    last = epoch == train.epochs
    checkpoint = epoch % max(1, train.checkpoint_every) == 0 or last
    validate = bool(train.val_every) and (epoch % train.val_every == 0 or last or checkpoint)
    return validate, checkpoint


def train_epoch(engine, batches: Iterable[dict], cfg: Config, state: dict, ctx: dict) -> dict:
    """One pass over this worker's shard; returns loss/throughput stats for the epoch."""
    device, dtype = ctx["device"], ctx["dtype"]
    engine.train()
    losses, samples, t0 = [], 0, time.perf_counter()
    max_micro = (cfg.train.max_steps_per_epoch or 0) * cfg.train.grad_accum
    for micro, batch in enumerate(batches, start=1):
        image, ids, attn, mask = to_inputs(batch, device, dtype)
        out = engine(image, ids, attn)
        loss = refseg_loss(out["logits"], mask, cfg.model.loss.bce_weight, cfg.model.loss.dice_weight)
        engine.backward(loss)
        engine.step()
        samples += image.shape[0]
        losses.append(float(loss.detach()))
        if micro % cfg.train.grad_accum == 0:
            state["global_step"] += 1
            _maybe_fail(cfg, ctx, state["global_step"])
            if ctx["rank"] == 0 and state["global_step"] % max(1, cfg.train.log_every) == 0:
                _progress(cfg, state, ctx, micro, losses, samples, time.perf_counter() - t0)
        if max_micro and micro >= max_micro:
            break
    elapsed = time.perf_counter() - t0
    local = torch.tensor([sum(losses), len(losses), samples], dtype=torch.float64)
    total = all_reduce_sum(local)
    return {
        "loss": float(total[0] / max(1.0, total[1])),
        "samples": int(total[2]),
        "samples_per_s": float(total[2]) / max(elapsed, 1e-9),
        "epoch_time_s": elapsed,
    }


@torch.no_grad()
def validate(engine, batches: Iterable[dict], ctx: dict) -> dict:
    """Score this worker's share of the val split; merge exact per-sample states across workers."""
    engine.eval()
    metrics = SegMetrics()
    for batch in batches:
        image, ids, attn, mask = to_inputs(batch, ctx["device"], ctx["dtype"])
        logits = engine(image, ids, attn)["logits"][:, 0]
        metrics.update((logits > 0).cpu().numpy(), (mask > 0.5).cpu().numpy())
    merged = SegMetrics()
    for state in all_gather_objects(metrics.state()):
        merged.merge(SegMetrics.from_state(state))
    result = merged.compute()
    out = {
        "val_oiou": result["oiou"],
        "val_miou": result["miou"],
        "val_median_iou": result["median_iou"],
        "val_dice": result["dice"],
        "val_samples": result["num_samples"],
    }
    for t, v in result["precision_at"].items():
        out[f"val_prec_{round(float(t) * 100)}"] = v
    return out


# ----------------------------------------------------------------------------- collectives
def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _dist_ready() and torch.distributed.get_world_size() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


def shard_cache(shard, cfg: Config) -> tuple[Any, int]:
    """data.cache: (ShardCache of this rank's rows, batches per epoch that every rank can make)."""
    from refseg.data.cache import ShardCache
    from refseg.data.ray_data import get_tokenizer, sample_opts, tokenizer_spec

    cache = ShardCache(shard.iter_batches(batch_format="numpy"), get_tokenizer(tokenizer_spec(cfg.model.text)),
                       sample_opts(cfg.data, train=True))
    batches = len(cache) // cfg.train.batch_size
    # every rank must run the same number of steps (collectives); streaming_split(equal=True) gives
    # equal shards, and agreeing on the minimum keeps it so if a shard ever comes up short
    if _dist_ready() and torch.distributed.get_world_size() > 1:
        t = torch.tensor([batches], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        batches = int(t.item())
    return cache, batches


def all_gather_objects(obj: Any) -> list:
    if _dist_ready() and torch.distributed.get_world_size() > 1:
        out: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(engine, directory: Path, cfg: Config, state: dict, rank: int) -> None:
    """Every rank writes its ZeRO shard; rank 0 adds the resolved config and the run state."""
    engine.save_checkpoint(str(directory), tag=CKPT_TAG, client_state={"refseg": dict(state)})
    if rank == 0:
        (directory / "config.yaml").write_text(cfg.to_yaml())
        (directory / STATE_FILE).write_text(json.dumps(state, indent=1))


def load_checkpoint(engine, directory: Path) -> dict:
    """Restore model, optimizer, LR schedule and the refseg run state from a checkpoint dir."""
    _, client = engine.load_checkpoint(str(directory), tag=CKPT_TAG)
    if client and "refseg" in client:
        return dict(client["refseg"])
    return json.loads((directory / STATE_FILE).read_text())


def _maybe_fail(cfg: Config, ctx: dict, step: int) -> None:
    """Test hook: rank 1 (or 0 with one worker) dies at ``train.fail_at_step`` on the first attempt."""
    k = cfg.train.fail_at_step
    if k is None or step != k or ctx["rank"] != min(1, ctx["world"] - 1):
        return
    marker = Path(ctx["output_dir"]) / ".fail_injected"
    if marker.exists():
        return
    marker.write_text(str(step))
    say(f"fail_at_step={k}: worker rank {ctx['rank']} exits now (test hook)")
    os._exit(1)


def _brief(metrics: dict) -> str:
    """'loss 0.41 val_miou 0.8 ...': the epoch's figures, rounded, without the bookkeeping ones."""
    skip = {"epoch", "samples", "val_median_iou", "val_dice", "elapsed_s"}
    return " ".join(f"{k} {float(v):.4g}" for k, v in metrics.items() if k not in skip)


def _progress(cfg: Config, state: dict, ctx: dict, micro: int, losses: list, samples: int, dt: float):
    steps_per_epoch = ctx["steps_per_epoch"]
    step_in_epoch = micro // cfg.train.grad_accum
    rate = samples * ctx["world"] / max(dt, 1e-9)
    eta = (steps_per_epoch - step_in_epoch) * dt / max(step_in_epoch, 1)
    recent = losses[-cfg.train.log_every * cfg.train.grad_accum :]
    say(
        f"epoch {state['epoch'] + 1}/{cfg.train.epochs} step {step_in_epoch}/{steps_per_epoch} "
        f"loss {np.mean(recent):.4f} {rate:.1f} samples/s ETA {eta:.0f}s"
    )


# ----------------------------------------------------------------------------- time budget
def fit_epochs(done: int, per_epoch_s: float, left_s: float, most: int) -> int:
    """The run's epoch count when ``done`` epochs are finished, each further one takes ``per_epoch_s``
    (validation and checkpoints included) and ``left_s`` seconds of the budget remain: at least one more
    (the last epoch validates, checkpoints and ends the schedule), at most ``most`` (train.epochs)."""
    more = min(float(most), max(0.0, left_s) // per_epoch_s) if per_epoch_s > 0 else most
    return max(done + 1, min(most, done + int(more)))


def with_epochs(cfg: Config, epochs: int) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=int(epochs)))


def fit_to_budget(cfg: Config, state: dict, walls: list[float], used_s: float, scheduler, ctx: dict) -> Config:
    """train.time_budget_s: fit the epoch count to the wall time left (every rank agrees on the smallest
    count), re-aim the LR schedule at the new last step and remember the count in the run state.

    First called after ``BUDGET_TIMED_EPOCHS`` timed epochs, then again at every checkpoint epoch with the
    mean of the latest ``BUDGET_WINDOW`` epochs, so the count follows the machine's real pace (the first
    epochs are slower: the first validation decodes the val split). ``used_s``: budget seconds spent."""
    budget = float(cfg.train.time_budget_s)
    recent = walls[-(BUDGET_WINDOW + 1):]
    per_epoch = (recent[-1] - recent[0]) / (len(recent) - 1)
    most = ctx["most_epochs"]  # train.epochs as configured (cfg.train.epochs is the fitted count after a fit)
    n = fit_epochs(state["epoch"], per_epoch, budget * (1 - BUDGET_MARGIN) - used_s, most)
    if _dist_ready() and torch.distributed.get_world_size() > 1:
        t = torch.tensor([n], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        n = int(t.item())
    before = state.get("epochs")
    state["epochs"] = n
    set_schedule_total(scheduler, n * ctx["steps_per_epoch"])
    if ctx["rank"] == 0 and n != before:
        say(f"time budget {budget:.0f} s: {used_s:.0f} s used, {per_epoch:.1f} s per epoch -> {n} epochs "
            f"(train.epochs={most} at most); the LR schedule now ends at step {n * ctx['steps_per_epoch']}")
    return with_epochs(cfg, n)


def budget_spent_before(state: dict, t0: float) -> float:
    """Budget seconds that earlier ``refseg train`` calls of this run spent (a ``--resume`` continues their
    count; the pause between the calls is not counted). A restart after a worker failure within the call
    that started at ``t0`` keeps counting from ``t0``, so the time the failure cost is counted."""
    if state.get("budget_t0") == t0:
        return float(state.get("budget_spent_before_s", 0.0))
    return float(state.get("budget_used_s", 0.0))


def set_schedule_total(scheduler, total_steps: int) -> None:
    """Point every LambdaLR multiplier (ds_config.PolySchedule) at ``total_steps``."""
    for fn in getattr(scheduler, "lr_lambdas", []):
        if hasattr(fn, "set_total"):
            fn.set_total(total_steps)


# ----------------------------------------------------------------------------- the loop
def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point. ``loop_config`` = {config, output_dir, steps_per_epoch, local}."""
    import ray.train

    cfg = config_from_dict(loop_config["config"])
    # Ray Data hands read-only (zero-copy) arrays and nothing here writes to them: silence torch's
    # warning once per worker instead of per batch
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    if not cfg.train.use_gpu:
        torch.set_num_threads(max(1, math.floor(cfg.train.cpus_per_worker)))
    device = pick_device(cfg.train.use_gpu)
    steps_per_epoch = int(loop_config["steps_per_epoch"])
    engine, scheduler = setup_engine(cfg, steps_per_epoch * cfg.train.epochs, device)
    ctx = {
        "rank": rank, "world": world, "device": device, "dtype": engine_dtype(cfg),
        "output_dir": loop_config["output_dir"], "steps_per_epoch": steps_per_epoch,
    }
    local = bool(loop_config.get("local"))
    state = {"epoch": 0, "global_step": 0, "history": []}
    restore = ray.train.get_checkpoint()
    if restore is not None:
        with restore.as_directory() as d:
            state = load_checkpoint(engine, Path(d))
    elif loop_config.get("resume_from"):
        state = load_checkpoint(engine, Path(loop_config["resume_from"]))
    budget = cfg.train.time_budget_s
    ctx["most_epochs"] = cfg.train.epochs
    if budget and state.get("epochs"):  # fitted to the budget before this restart / resume: keep it
        cfg = with_epochs(cfg, min(cfg.train.epochs, state["epochs"]))
    set_schedule_total(scheduler, steps_per_epoch * cfg.train.epochs)  # a checkpoint's count or this config's
    if state["epoch"] and rank == 0:
        say(f"resumed at epoch {state['epoch']} step {state['global_step']}")
    t0 = float(loop_config.get("t0") or time.time())
    spent_before = budget_spent_before(state, t0)
    walls: list[float] = []  # when each epoch this process ran had trained and validated

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard(f"val_{rank}") if cfg.train.val_every else None
    # this rank's val batches: decoded on the first validation and replayed after when they are small
    val_batches = None if val_shard is None else KeptBatches(
        lambda: val_shard.iter_batches(batch_size=cfg.eval.batch_size, batch_format="numpy"), VAL_KEEP_BYTES)
    iter_kw = {"batch_size": cfg.train.batch_size, "drop_last": True, "prefetch_batches": 2}
    cache = None
    while state["epoch"] < cfg.train.epochs:
        epoch = state["epoch"]
        if cfg.data.cache:  # this rank's decoded rows, pulled once, re-sampled here every epoch
            if cache is None:
                cache, cache_batches = shard_cache(train_shard, cfg)
            batches = cache.epoch(cfg.train.batch_size, cache_batches)
        else:
            batches = train_shard.iter_batches(**iter_kw, batch_format="numpy")
        stats = train_epoch(engine, batches, cfg, state, ctx)
        metrics = {"epoch": epoch + 1, "step": state["global_step"], "lr": max(scheduler.get_last_lr()), **stats}
        last = epoch + 1 == cfg.train.epochs
        validate_now, checkpoint = epoch_actions(epoch + 1, cfg.train)
        if val_shard is not None and validate_now:
            metrics.update(validate(engine, val_batches, ctx))
        if "t0" in loop_config:  # wall seconds since the driver started this run (or this resume)
            metrics["elapsed_s"] = time.time() - loop_config["t0"]
        state["epoch"] = epoch + 1
        state["history"].append(metrics)
        walls.append(time.time())  # each interval: a checkpoint, an epoch and its validation
        if budget:
            state.update(budget_t0=t0, budget_spent_before_s=spent_before,
                         budget_used_s=spent_before + walls[-1] - t0)
            if not last and len(walls) > BUDGET_TIMED_EPOCHS and ("epochs" not in state or checkpoint):
                # before this epoch's checkpoint, which saves the count
                cfg = fit_to_budget(cfg, state, walls, state["budget_used_s"], scheduler, ctx)
        if rank == 0:
            say(f"epoch {epoch + 1} done: {_brief(metrics)}")
        if last and loop_config.get("probe_path"):
            _write_probe(engine, cfg, ctx, loop_config["probe_path"])
        if checkpoint:
            _checkpoint_and_report(engine, cfg, state, metrics, rank, local, loop_config)
        else:
            ray.train.report(metrics)


def probe_inputs(cfg: Config, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed input batch for parity checks (engine vs exported model)."""
    g = torch.Generator().manual_seed(1234)
    size, length = cfg.data.image_size, cfg.data.max_tokens
    image = torch.randn(batch, 3, size, size, generator=g)
    ids = torch.randint(5, 100, (batch, length), generator=g)
    attn = torch.ones(batch, length, dtype=torch.long)
    attn[0, length // 2 :] = 0
    return image, ids, attn


@torch.no_grad()
def _write_probe(engine, cfg: Config, ctx: dict, path: str) -> None:
    """Every rank runs the forward (ZeRO-3 gathers parameters collectively); rank 0 saves logits."""
    engine.eval()
    image, ids, attn = probe_inputs(cfg)
    logits = engine(image.to(ctx["device"], ctx["dtype"]), ids.to(ctx["device"]), attn.to(ctx["device"]))["logits"]
    if ctx["rank"] == 0:
        torch.save(logits.float().cpu(), path)


def _checkpoint_and_report(engine, cfg, state, metrics, rank, local, loop_config) -> None:
    import ray.train
    from ray.train import Checkpoint

    if local:  # Ray Train local mode keeps only a reference: write a real directory ourselves
        directory = Path(loop_config["output_dir"]) / "checkpoints" / f"epoch_{state['epoch']:04d}"
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
