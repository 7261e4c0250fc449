"""The per-worker training function (in every Ray Train worker, or in the driver with --local).

    TorchTrainer(train_loop_per_worker, train_loop_config=dataclasses.asdict(LoopConfig(...)), ...)

Built from small helpers in the style of Ray's DeepSpeed example: set up the engine (engine.py),
restore (checkpoint.py), train and validate one epoch (epoch.py), fit the time budget (budget.py),
save + report a checkpoint; when the driver asks (stop.py), stop after a step with a checkpoint whose
run state lets a resume finish the epoch. The driver (driver.py) owns Ray start-up, paths and the outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from refseg.config import Config, config_from_dict
from refseg.data.cache import KeptBatches
from refseg.runtime import keep_freed_memory
from refseg.train.budget import TimeBudget, set_schedule_total, with_epochs
from refseg.train.checkpoint import NOT_VALIDATED, RunState, load_checkpoint, save_and_report, score_key
from refseg.train.engine import (
    accumulation,
    all_reduce_min,
    average_norm_stats,
    engine_dtype,
    pick_device,
    setup_engine,
)
from refseg.train.epoch import WorkerContext, brief, epoch_actions, say, train_epoch, unseen_batches, validate
from refseg.train.init import init_weights
from refseg.train.outputs import open_run_log
from refseg.train.stop import StopWatch

VAL_KEEP_BYTES = 2**29  # decoded val batches a worker keeps in memory to replay (larger val shards stream)
SPARE_STEPS = 8  # a stopped epoch's rest: steps of trained rows a rank may repeat when its new ones run out


@dataclasses.dataclass
class LoopConfig:
    """What the driver hands every worker (as a dict: Ray Train's ``train_loop_config``)."""

    config: dict  # the resolved Config.to_dict()
    output_dir: str  # absolute: Train V2 workers run in another working directory
    steps_per_epoch: int  # optimizer steps per epoch, the same on every rank
    t0: float  # time.time() when the driver started this run (or this resume)
    local: bool = False  # Ray Train local mode: the loop runs in the driver, checkpoints go to output_dir
    resume_from: str | None = None  # local mode --resume: the latest checkpoint dir
    stop: str | None = None  # the name of the driver's refseg.train.stop.StopRequest (None: no stopping)
    val_shards: int = 1  # the val_<r> datasets: rank k of W workers scores val_k, val_k+W, ... (any W)


def worker_context(cfg: Config, steps_per_epoch: int) -> WorkerContext:
    """This worker's rank, world size and device; CPU workers use ``train.cpus_per_worker`` threads."""
    import ray.train

    train_ctx = ray.train.get_context()
    if not cfg.train.use_gpu:
        torch.set_num_threads(max(1, math.floor(cfg.train.cpus_per_worker)))
        keep_freed_memory(cfg.train.cpu_keep_freed_mb)
    return WorkerContext(train_ctx.get_world_rank(), train_ctx.get_world_size(), pick_device(cfg.train.use_gpu),
                         engine_dtype(cfg), steps_per_epoch)


def restore(engine, run: LoopConfig) -> RunState:
    """The run state to continue from: Ray Train's checkpoint after a worker failure or a resumed run,
    a local-mode checkpoint dir, or a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            return load_checkpoint(engine, Path(d))
    if run.resume_from:
        return load_checkpoint(engine, Path(run.resume_from))
    return RunState()


def shard_cache(shard, cfg: Config) -> tuple[Any, int]:
    """data.cache: (ShardCache of this rank's rows, batches per epoch that every rank can make)."""
    from refseg.data.cache import ShardCache
    from refseg.data.samples import sample_opts
    from refseg.models import load_tokenizer

    cache = ShardCache(shard.iter_batches(batch_format="numpy"), load_tokenizer(cfg.model.text),
                       sample_opts(cfg.data, train=True))
    # every rank must run the same number of steps (collectives); streaming_split(equal=True) gives
    # equal shards, and agreeing on the minimum keeps it so if a shard ever comes up short
    return cache, all_reduce_min(len(cache) // cfg.train.batch_size)


def train_batches(shard, cfg: Config) -> tuple[Callable[[dict | None], Iterable[dict]], Callable[[], Iterable[dict]]]:
    """Two functions: one epoch of this rank's training batches, re-sampled from the rows decoded once
    (data.cache, pulled on the first epoch) or streamed from its Ray Data shard (given a stopped run's
    ``RunState.partial``, the rest of that epoch: the rows it has not trained); and the samples of
    ``train.no_target_refit_epochs``: every sentence of the cached rows without augmentation, or without
    data.cache a further pass of the stream."""
    size = cfg.train.batch_size
    cached = functools.cache(lambda: shard_cache(shard, cfg))

    def epoch(partial: dict | None) -> Iterable[dict]:
        if cfg.data.cache:
            cache, count = cached()
            batches = cache.epoch(size, count)
        else:
            batches = shard.iter_batches(batch_size=size, drop_last=True, prefetch_batches=2, batch_format="numpy")
        if partial is None:
            return batches
        return unseen_batches(batches, partial["seen"], size, SPARE_STEPS * size * cfg.train.grad_accum)

    def refit_samples() -> Iterable[dict]:
        return cached()[0].every_sentence(cfg.eval.batch_size) if cfg.data.cache else epoch(None)

    return epoch, refit_samples


def val_batches(shards: list, cfg: Config) -> Iterable[dict]:
    """This rank's val batches (from its ``shards``): decoded on the first validation and replayed after
    when they are small."""
    size = cfg.eval.batch_size
    return KeptBatches(lambda: (b for s in shards for b in s.iter_batches(batch_size=size, batch_format="numpy")),
                       VAL_KEEP_BYTES)


def fit_budget(budget: TimeBudget, cfg: Config, state: RunState, scheduler, ctx: WorkerContext) -> Config:
    """Fit the epoch count to the budget left and re-aim the LR schedule at its last step."""
    before = state.epochs
    n = budget.fit(state)
    set_schedule_total(scheduler, n * ctx.steps_per_epoch)
    if ctx.rank == 0 and n != before:
        say(f"time budget {budget.seconds:.0f} s: {state.budget_used_s:.0f} s used, {budget.per_epoch_s():.1f} s "
            f"per epoch -> {n} epochs (train.epochs={budget.most_epochs} at most); the LR schedule now ends at "
            f"step {n * ctx.steps_per_epoch}")
    return with_epochs(cfg, n)


def refit(engine, samples: Iterable[dict], cfg: Config, ctx: WorkerContext) -> dict:
    """train.no_target_refit_epochs (refseg/train/refit.py), with a line on rank 0."""
    from refseg.train.refit import refit_no_target

    start = time.time()
    report = refit_no_target(engine, samples, cfg, ctx)
    if ctx.rank == 0:
        if report.get("refit_samples"):
            say(f"no-target head refitted on {report['refit_samples']} training samples in {time.time() - start:.1f} s: "
                f"held-out BCE {report['refit_heldout_bce_before']:.4f} -> {report['refit_heldout_bce']:.4f} "
                f"(pass {report['refit_epochs']} of {cfg.train.no_target_refit_epochs})")
        else:
            say("no-target head not refitted: no training samples reached the refit")
    return report


def save_stopped(engine, cfg: Config, state: RunState, ctx: WorkerContext, run: LoopConfig,
                 budget: TimeBudget | None, saved: bool) -> None:
    """Every rank stopped after the same step: save and report a checkpoint, unless the latest one
    (``saved``) holds this state already."""
    steps = (state.partial or {}).get("steps", 0)
    if ctx.rank == 0:
        where = f"in epoch {state.epoch + 1} after step {state.global_step}" if steps else f"after epoch {state.epoch}"
        say(f"stopped {where}" + ("" if saved else ": saving a checkpoint"))
    if saved:
        return
    if budget is not None:
        budget.record(state, time.time())
    metrics = {"epoch": state.epoch, "step": state.global_step, "epoch_steps": steps}
    if cfg.train.val_every:  # not validated: an impossible oIoU ranks it below every validated checkpoint
        metrics[score_key(cfg)] = NOT_VALIDATED  # (without a score Ray logs an error; -inf becomes null in its JSON)
    save_and_report(engine, cfg, state, metrics, ctx.rank, run.output_dir, run.local)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point: ``loop_config`` is ``dataclasses.asdict(LoopConfig(...))``."""
    import ray.train

    run = LoopConfig(**loop_config)
    cfg = config_from_dict(run.config)
    # Ray Data hands read-only (zero-copy) arrays and nothing here writes to them: silence torch's
    # warning once per worker instead of per batch
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
    ctx = worker_context(cfg, run.steps_per_epoch)
    accum, note = accumulation(cfg.train, ctx.world)  # elastic: the global batch stays, the accumulation adapts
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=accum))
    if note and ctx.rank == 0:
        say(note)
    fresh = ray.train.get_checkpoint() is None and not run.resume_from  # a resume restores its own weights
    init = functools.partial(init_weights, path=cfg.train.init_from, strict=cfg.train.init_strict) \
        if fresh and cfg.train.init_from else None
    engine, scheduler = setup_engine(cfg, run.steps_per_epoch * cfg.train.epochs, ctx.device, init)
    state = restore(engine, run)
    budget = None
    if cfg.train.time_budget_s:
        budget = TimeBudget.start(cfg.train.time_budget_s, cfg.train.epochs, state, run.t0,
                                  reserve_epochs=int(cfg.train.no_target_refit_epochs > 0))  # the refit's time
        if state.epochs:  # fitted to the budget before this restart / resume: keep it
            cfg = with_epochs(cfg, min(cfg.train.epochs, state.epochs))
    set_schedule_total(scheduler, run.steps_per_epoch * cfg.train.epochs)  # a checkpoint's count or the config's
    if (state.epoch or state.partial) and ctx.rank == 0:
        inside = f", {state.partial['steps']} steps into epoch {state.epoch + 1}" if state.partial else ""
        resized = f", ZeRO state resharded from {state.world} to {ctx.world} workers" \
            if state.world not in (None, ctx.world) else ""
        say(f"resumed at epoch {state.epoch} step {state.global_step}{inside}{resized}")

    watch = StopWatch(run.stop)
    log = open_run_log(cfg, run.output_dir, ctx.rank, state.global_step)  # rank 0: epoch files and trackers
    next_epoch, refit_samples = train_batches(ray.train.get_dataset_shard("train"), cfg)
    val = val_batches([ray.train.get_dataset_shard(f"val_{r}") for r in range(ctx.rank, run.val_shards, ctx.world)],
                      cfg) if cfg.train.val_every else None
    saved_step = None if state == RunState() else state.global_step  # the global step of the latest checkpoint
    while state.epoch < cfg.train.epochs:
        stats = train_epoch(engine, next_epoch(state.partial), cfg, state, ctx, watch.requested, log.step)
        if stats is None:  # the driver asked to stop
            save_stopped(engine, cfg, state, ctx, run, budget, saved=state.global_step == saved_step)
            log.close()
            return
        metrics = {"epoch": state.epoch + 1, "step": state.global_step, "lr": max(scheduler.get_last_lr()), **stats}
        average_norm_stats(engine.module)  # the refit, validation and checkpoint see one model on every rank
        last = state.epoch + 1 == cfg.train.epochs
        if last and cfg.train.no_target_refit_epochs:  # before the last validation and checkpoint
            metrics.update(refit(engine, refit_samples(), cfg, ctx))
        validate_now, checkpoint = epoch_actions(state.epoch + 1, cfg.train)
        if val is not None and validate_now:
            metrics.update(validate(engine, val, ctx, cfg))
        metrics["elapsed_s"] = time.time() - run.t0  # wall seconds since the driver started this run (or resume)
        state.epoch += 1
        state.history.append(metrics)
        if budget is not None:  # each interval: a checkpoint, an epoch and its validation
            budget.record(state, time.time())
            if budget.due(state, last, checkpoint):
                cfg = fit_budget(budget, cfg, state, scheduler, ctx)
        if ctx.rank == 0:
            say(f"epoch {state.epoch} done: {brief(metrics)}")
        log.epoch(state.history)
        if checkpoint:
            save_and_report(engine, cfg, state, metrics, ctx.rank, run.output_dir, run.local)
            saved_step = state.global_step
        else:
            ray.train.report(metrics)
    log.close()
