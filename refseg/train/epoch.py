"""One epoch on a DeepSpeed engine: train over this rank's batches, validate this rank's val share.

    stats = train_epoch(engine, batches, cfg, state, ctx, stop)   # {"loss", "samples", ...}; None: stopped
    metrics = validate(engine, val_batches, ctx, cfg)        # {"val_oiou", "val_miou", ...}, all ranks merged
    # generalized data (data.dataset grefcoco): {"val_giou", "val_ciou", "val_n_acc", "val_t_acc", ...}
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from refseg.config import Config, ModelConfig, TrainConfig
from refseg.config.schema import GENERALIZED_DATASETS
from refseg.data.transforms import resize_geometry
from refseg.losses import generalized_loss, refseg_loss
from refseg.metrics import GresMetrics, SegMetrics
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


def train_epoch(engine, batches: Iterable[dict], cfg: Config, state: RunState, ctx: WorkerContext,
                stop: Callable[[], bool], on_step: Callable[[int, dict], None] | None = None) -> dict | None:
    """One epoch over this worker's batches (counting ``state.global_step``), or the rest of the epoch
    ``state.partial`` holds; returns the whole epoch's mean loss and throughput over every rank.

    Before each optimizer step the ranks agree (one all-reduce) whether any was asked to ``stop`` or has
    run out of batches: all then end after the same step (the ZeRO collectives need every rank). After a
    stop it returns None with ``state.partial`` holding the epoch so far (unchanged without a new step).
    On rank 0, every ``train.log_every`` steps: the progress line and ``on_step(global_step, {"loss",
    "samples_per_s", "lr"})``."""
    engine.train()
    part = state.partial or {}
    first = done = part.get("steps", 0)
    batches = iter(batches)
    losses, seen, samples, stopped, t0 = [], [], 0, False, time.perf_counter()
    while done < ctx.steps_per_epoch:
        group = list(itertools.islice(batches, cfg.train.grad_accum))
        flags = all_reduce_sum(torch.tensor([stop(), len(group) < cfg.train.grad_accum], dtype=torch.int64))
        stopped = bool(flags[0])
        if stopped or flags[1]:
            break
        for batch in group:
            image, ids, attn, mask = to_inputs(batch, ctx.device, ctx.dtype)
            out = engine(image, ids, attn)
            loss = batch_loss(out, mask, batch, cfg.model)
            engine.backward(loss)
            engine.step()
            samples += image.shape[0]
            losses.append(float(loss.detach()))
            seen.extend(np.asarray(batch["ref_id"]).tolist())
        done += 1
        state.global_step += 1
        if ctx.rank == 0 and state.global_step % max(1, cfg.train.log_every) == 0:
            figures = _progress(cfg, state, ctx, done, done - first, losses, samples, time.perf_counter() - t0)
            if on_step is not None:  # rank 0's trackers (refseg.train.outputs.RunLog.step)
                on_step(state.global_step, {**figures, "lr": max(engine.get_lr())})
    elapsed = time.perf_counter() - t0
    total = all_reduce_sum(torch.tensor([sum(losses), len(losses), samples], dtype=torch.float64))
    sums = {"loss_sum": part.get("loss_sum", 0.0) + float(total[0]), "losses": part.get("losses", 0) + int(total[1]),
            "samples": part.get("samples", 0) + int(total[2]), "time_s": part.get("time_s", 0.0) + elapsed}
    if stopped:
        if done > first:
            trained = [r for rank_seen in all_gather_objects(seen) for r in rank_seen]
            state.partial = {"steps": done, **sums, "seen": sorted(part.get("seen", []) + trained)}
        return None
    state.partial = None
    return {
        "loss": sums["loss_sum"] / max(1, sums["losses"]),
        "samples": sums["samples"],
        "samples_per_s": sums["samples"] / max(sums["time_s"], 1e-9),
        "epoch_time_s": sums["time_s"],
        "workers": ctx.world,  # this epoch's worker count (elastic training resizes between epochs' checkpoints)
    }


def batch_loss(out: dict, mask: torch.Tensor, batch: dict, model: ModelConfig) -> torch.Tensor:
    """The training loss of one batch: :func:`refseg_loss` on the mask logits, or with the no-target
    head :func:`generalized_loss` against the batch's ``no_target`` column (B,) {0,1}."""
    w = model.loss
    if "no_target_logit" not in out:
        return refseg_loss(out["logits"], mask, w.bce_weight, w.dice_weight)
    label = torch.as_tensor(np.asarray(batch["no_target"]), dtype=torch.float32, device=mask.device)
    return generalized_loss(out["logits"], mask, out["no_target_logit"], label, w.bce_weight, w.dice_weight,
                            w.no_target_weight, w.empty_mask_weight, w.no_target_pos_weight)


def on_image(pred: torch.Tensor, batch: dict, keep_aspect: bool) -> torch.Tensor:
    """(B, S, S) bool predictions without the pixels on ``keep_aspect``'s padding: validation scores the
    image's content at the training resolution, as ``refseg evaluate --at-train-res`` does, and the
    padding is no part of any image (its ground truth is 0 there; a prediction there is no error)."""
    if not keep_aspect:
        return pred
    size = pred.shape[-1]
    content = torch.tensor([resize_geometry(int(h), int(w), size, True) for h, w in zip(batch["orig_h"], batch["orig_w"])],
                           device=pred.device)  # (B, 2): rows, columns of the image
    at = torch.arange(size, device=pred.device)
    return pred & (at[None, :, None] < content[:, 0, None, None]) & (at[None, None, :] < content[:, 1, None, None])


def predicted_no_target(out: dict, masks: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B,) bool: the samples the model calls empty -- an empty predicted mask (GRES: a prediction
    without any foreground pixel is a no-target prediction), and with the head also every sample whose
    sigmoid(no-target logit) > ``threshold``. ``masks``: (B, H, W) bool predictions."""
    empty = ~masks.flatten(1).any(1)
    if "no_target_logit" in out:
        return empty | (torch.sigmoid(out["no_target_logit"].float()) > threshold)
    return empty


def unseen_batches(batches: Iterable[dict], seen: Collection[int], batch_size: int, spare: int) -> Iterator[dict]:
    """``batches`` re-cut into batches of ``batch_size`` rows whose ``ref_id`` is not in ``seen``: the rest
    of an epoch that a stopped run began. When those run out, up to ``spare`` of the rows passed over
    fill the last batches (a rank may now hold more of ``seen`` than its share, and every rank must
    still take the epoch's steps)."""
    seen_ids = np.fromiter(seen, np.int64, len(seen))
    rows: dict | None = None
    kept: dict | None = None
    for batch in batches:
        new = ~np.isin(np.asarray(batch["ref_id"]), seen_ids)
        rows = _join(rows, _take(batch, new))
        room = spare - (len(kept["ref_id"]) if kept else 0)
        if room > 0:
            kept = _join(kept, _take(batch, np.flatnonzero(~new)[:room]))
        while len(rows["ref_id"]) >= batch_size:
            yield _take(rows, slice(0, batch_size))
            rows = _take(rows, slice(batch_size, None))
    if rows is not None and kept is not None:
        rows = _join(rows, kept)
        for start in range(0, len(rows["ref_id"]) - batch_size + 1, batch_size):
            yield _take(rows, slice(start, start + batch_size))


def _take(batch: dict, index: Any) -> dict:
    return {k: np.asarray(v)[index] for k, v in batch.items()}


def _join(a: dict | None, b: dict) -> dict:
    return b if a is None else {k: np.concatenate([a[k], b[k]]) for k in a}


@torch.no_grad()
def validate(engine, batches: Iterable[dict], ctx: WorkerContext, cfg: Config | None = None) -> dict:
    """Score this worker's share of the val split; merge exact per-sample states across workers.
    Generalized data (``cfg.data.dataset`` in GENERALIZED_DATASETS) is scored by :func:`validate_gres`."""
    if cfg is not None and cfg.data.dataset in GENERALIZED_DATASETS:
        return validate_gres(engine, batches, ctx, cfg.model.no_target_threshold, cfg.data.keep_aspect)
    engine.eval()
    metrics = SegMetrics()
    keep_aspect = cfg is not None and cfg.data.keep_aspect
    for batch in batches:
        image, ids, attn, mask = to_inputs(batch, ctx.device, ctx.dtype)
        logits = engine(image, ids, attn)["logits"][:, 0]
        metrics.update(on_image(logits > 0, batch, keep_aspect).cpu().numpy(), (mask > 0.5).cpu().numpy())
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


@torch.no_grad()
def validate_gres(engine, batches: Iterable[dict], ctx: WorkerContext, threshold: float,
                  keep_aspect: bool = False) -> dict:
    """GRES validation (:class:`refseg.metrics.GresMetrics`) of this worker's share, merged across workers:
    a sample predicted no-target (:func:`predicted_no_target` at ``threshold``) has an empty mask.
    -> ``val_giou, val_ciou, val_n_acc, val_t_acc, val_samples, val_prec_70 .. val_prec_90``."""
    engine.eval()
    metrics = GresMetrics()
    for batch in batches:
        image, ids, attn, mask = to_inputs(batch, ctx.device, ctx.dtype)
        out = engine(image, ids, attn)
        pred = on_image(out["logits"][:, 0] > 0, batch, keep_aspect)  # (B, H, W)
        empty = predicted_no_target(out, pred, threshold)  # (B,)
        pred &= ~empty[:, None, None]
        metrics.update(pred.cpu().numpy(), (mask > 0.5).cpu().numpy(), np.asarray(batch["no_target"]) > 0.5,
                       empty.cpu().numpy())
    merged = GresMetrics()
    for part in all_gather_objects(metrics.state()):
        merged.merge(GresMetrics.from_state(part))
    result = merged.compute()
    out = {f"val_{k}": result[k] for k in ("giou", "ciou", "n_acc", "t_acc")}
    out["val_samples"] = result["num_samples"]
    for t, v in result["precision_at"].items():
        out[f"val_prec_{round(float(t) * 100)}"] = v
    return out


def brief(metrics: dict) -> str:
    """'loss 0.41 val_miou 0.8 ...': the epoch's figures, rounded, without the bookkeeping ones."""
    skip = {"epoch", "samples", "val_median_iou", "val_dice", "elapsed_s", "workers"}
    # refit_*: the no-target refit has its own line
    return " ".join(f"{k} {float(v):.4g}" for k, v in metrics.items() if k not in skip and not k.startswith("refit_"))


def _progress(cfg: Config, state: RunState, ctx: WorkerContext, step_in_epoch: int, steps: int, losses: list,
              samples: int, dt: float) -> dict:
    """The progress line after ``step_in_epoch`` of the epoch, ``steps`` of them (``samples``) in ``dt`` s;
    returns its figures: ``{"loss": mean of the recent micro-batches, "samples_per_s": over every rank}``."""
    rate = samples * ctx.world / max(dt, 1e-9)
    eta = (ctx.steps_per_epoch - step_in_epoch) * dt / max(steps, 1)
    recent = losses[-cfg.train.log_every * cfg.train.grad_accum :]
    say(
        f"epoch {state.epoch + 1}/{cfg.train.epochs} step {step_in_epoch}/{ctx.steps_per_epoch} "
        f"loss {np.mean(recent):.4f} {rate:.1f} samples/s ETA {eta:.0f}s"
    )
    return {"loss": float(np.mean(recent)), "samples_per_s": rate}
