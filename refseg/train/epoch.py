"""One epoch on a DeepSpeed engine: train over this rank's batches, validate this rank's val share.

    stats = train_epoch(engine, batches, cfg, state, ctx)    # {"loss", "samples", "samples_per_s", ...}
    metrics = validate(engine, val_batches, ctx)             # {"val_oiou", "val_miou", ...}, all ranks merged
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterable

import numpy as np
import torch

from refseg.config import Config, TrainConfig
from refseg.losses import refseg_loss
from refseg.metrics import SegMetrics
from refseg.train.checkpoint import RunState
from refseg.train.engine import all_gather_objects, all_reduce_sum, to_inputs


@dataclasses.dataclass(frozen=True)
class WorkerContext:
    """This worker in the group: its rank of ``world``, the engine's device and input dtype, and the
    optimizer steps every rank takes per epoch."""

    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    steps_per_epoch: int


def say(message: str) -> None:
    """One progress line on the worker's stdout (Ray forwards it to the driver once).

    Not ``print``: Ray Train V2 patches ``print`` in its workers to log *and* echo, which doubles
    every line on the driver's console."""
    sys.stdout.write(f"[refseg] {message}\n")
    sys.stdout.flush()


def epoch_actions(epoch: int, train: TrainConfig) -> tuple[bool, bool]:
    """(validate, checkpoint) after 1-based ``epoch``: checkpoints every ``checkpoint_every`` epochs and
    at the last; validation every ``val_every`` epochs, at the last, and at every checkpoint (its val_oiou
    ranks it among the kept checkpoints), never with ``val_every=0``."""
    last = epoch == train.epochs
    checkpoint = epoch % max(1, train.checkpoint_every) == 0 or last
    validate = bool(train.val_every) and (epoch % train.val_every == 0 or last or checkpoint)
    return validate, checkpoint


def train_epoch(engine, batches: Iterable[dict], cfg: Config, state: RunState, ctx: WorkerContext) -> dict:
    """One pass over this worker's batches (counting ``state.global_step``); returns the epoch's mean loss
    and throughput over every rank."""
    engine.train()
    losses, samples, t0 = [], 0, time.perf_counter()
    max_micro = (cfg.train.max_steps_per_epoch or 0) * cfg.train.grad_accum
    for micro, batch in enumerate(batches, start=1):
        image, ids, attn, mask = to_inputs(batch, ctx.device, ctx.dtype)
        out = engine(image, ids, attn)
        loss = refseg_loss(out["logits"], mask, cfg.model.loss.bce_weight, cfg.model.loss.dice_weight)
        engine.backward(loss)
        engine.step()
        samples += image.shape[0]
        losses.append(float(loss.detach()))
        if micro % cfg.train.grad_accum == 0:
            state.global_step += 1
            if ctx.rank == 0 and state.global_step % max(1, cfg.train.log_every) == 0:
                _progress(cfg, state, ctx, micro, losses, samples, time.perf_counter() - t0)
        if max_micro and micro >= max_micro:
            break
    elapsed = time.perf_counter() - t0
    total = all_reduce_sum(torch.tensor([sum(losses), len(losses), samples], dtype=torch.float64))
    return {
        "loss": float(total[0] / max(1.0, total[1])),
        "samples": int(total[2]),
        "samples_per_s": float(total[2]) / max(elapsed, 1e-9),
        "epoch_time_s": elapsed,
    }


@torch.no_grad()
def validate(engine, batches: Iterable[dict], ctx: WorkerContext) -> dict:
    """Score this worker's share of the val split; merge exact per-sample states across workers."""
    engine.eval()
    metrics = SegMetrics()
    for batch in batches:
        image, ids, attn, mask = to_inputs(batch, ctx.device, ctx.dtype)
        logits = engine(image, ids, attn)["logits"][:, 0]
        metrics.update((logits > 0).cpu().numpy(), (mask > 0.5).cpu().numpy())
    merged = SegMetrics()
    for part in all_gather_objects(metrics.state()):
        merged.merge(SegMetrics.from_state(part))
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


def brief(metrics: dict) -> str:
    """'loss 0.41 val_miou 0.8 ...': the epoch's figures, rounded, without the bookkeeping ones."""
    skip = {"epoch", "samples", "val_median_iou", "val_dice", "elapsed_s"}
    return " ".join(f"{k} {float(v):.4g}" for k, v in metrics.items() if k not in skip)


def _progress(cfg: Config, state: RunState, ctx: WorkerContext, micro: int, losses: list, samples: int,
              dt: float) -> None:
    step_in_epoch = micro // cfg.train.grad_accum
    rate = samples * ctx.world / max(dt, 1e-9)
    eta = (ctx.steps_per_epoch - step_in_epoch) * dt / max(step_in_epoch, 1)
    recent = losses[-cfg.train.log_every * cfg.train.grad_accum :]
    say(
        f"epoch {state.epoch + 1}/{cfg.train.epochs} step {step_in_epoch}/{ctx.steps_per_epoch} "
        f"loss {np.mean(recent):.4f} {rate:.1f} samples/s ETA {eta:.0f}s"
    )
