"""After fit(): pick the checkpoint to export, write metrics.jsonl, curves.png, model.pt and summary.json."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
from pathlib import Path

from refseg.config import Config
from refseg.io import new_figure, save_figure_atomic, write_text_atomic
from refseg.train.checkpoint import (
    NOT_VALIDATED,
    RunState,
    checkpoint_epoch,
    export_checkpoint,
    local_checkpoints,
    read_state,
)


def _materialize(checkpoint, dest: Path) -> Path:
    """Copy a Ray Checkpoint (local or remote storage) to ``dest``."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.to_directory(str(dest))
    return dest


def plot_curves(history: list[dict], path: Path) -> None:
    """curves.png: train loss per epoch (left) and val oIoU / mIoU where validated (right)."""
    fig, (a, b) = new_figure(ncols=2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    a.plot(epochs, [h["loss"] for h in history], marker="o")
    a.set(xlabel="epoch", ylabel="train loss (BCE + Dice)", title="loss")
    val = [h for h in history if "val_oiou" in h]
    if val:
        b.plot([h["epoch"] for h in val], [h["val_oiou"] for h in val], marker="o", label="val oIoU")
        b.plot([h["epoch"] for h in val], [h["val_miou"] for h in val], marker="s", label="val mIoU")
        b.legend()
    b.set(xlabel="epoch", ylabel="IoU", title="validation", ylim=(0, 1))
    save_figure_atomic(fig, path)


def _local_checkpoints(out: Path, keep: int) -> tuple[Path, Path | None, RunState]:
    """Local mode: prune to best-K by val oIoU + latest; return (latest, best, the latest's run state).
    A stopped run's checkpoint inside an epoch is never scored (it was not validated)."""
    ckpts = local_checkpoints(out)
    latest = ckpts[-1]
    state = read_state(latest)
    by_epoch = {h["epoch"]: h for h in state.history}
    scored = [c for c in ckpts if "val_oiou" in by_epoch.get(checkpoint_epoch(c), {})]
    scored.sort(key=lambda c: by_epoch[checkpoint_epoch(c)]["val_oiou"], reverse=True)
    best = scored[0] if scored else None
    for c in ckpts:
        if c != latest and c not in scored[: max(1, keep)]:
            shutil.rmtree(c, ignore_errors=True)
    return latest, best, state


def interruption(cfg: Config, state: RunState, signum: int) -> dict | None:
    """Where a run that signal ``signum`` stopped ended, when before its last epoch: ``{"signal",
    "epochs_done", "step", "epoch_steps"}`` (optimizer steps into the next epoch); None for a finished run
    (or ``signum`` 0)."""
    steps = (state.partial or {}).get("steps", 0)
    if not signum or (not steps and state.epoch >= (state.epochs or cfg.train.epochs)):
        return None
    return {"signal": signal.Signals(signum).name, "epochs_done": state.epoch, "step": state.global_step,
            "epoch_steps": steps}


def write_outputs(cfg: Config, out: Path, result, *, local: bool, steps_per_epoch: int, wall_s: float,
                  stopped_by: int = 0) -> dict:
    """Write metrics.jsonl, curves.png, model.pt (from the best checkpoint by val oIoU, else the latest)
    and summary.json into ``out``; return the summary. A run stopped by signal ``stopped_by`` before its
    end gets ``"interrupted"`` (:func:`interruption`) and its outputs cover the epochs it finished."""
    if local:
        latest_dir, best_dir, state = _local_checkpoints(out, cfg.train.keep_checkpoints)
        best_path = str(best_dir or latest_dir)
    else:
        staging = Path(tempfile.mkdtemp(prefix="refseg-export-"))
        latest_dir = _materialize(result.checkpoint, staging / "latest")
        state = read_state(latest_dir)
        best_ckpt = result.checkpoint
        if cfg.train.val_every and result.best_checkpoints:
            scored = [(c, m) for c, m in result.best_checkpoints if m.get("val_oiou", NOT_VALIDATED) >= 0]
            if scored:
                best_ckpt = max(scored, key=lambda cm: cm[1]["val_oiou"])[0]
        best_dir = latest_dir if best_ckpt.path == result.checkpoint.path else _materialize(
            best_ckpt, staging / "best")
        best_path = best_ckpt.path
    history = state.history
    write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    plot_curves(history, out / "curves.png")
    model_path = export_checkpoint(best_dir or latest_dir, out / "model.pt")
    val = [h for h in history if "val_oiou" in h]
    best = max(val, key=lambda h: h["val_oiou"]) if val else None
    final = history[-1] if history else {}
    summary = {
        "best": {"oiou": best["val_oiou"], "miou": best["val_miou"], "epoch": best["epoch"]} if best else None,
        "final": {k: final[k] for k in ("epoch", "loss", "val_oiou", "val_miou") if k in final},
        "model_path": str(model_path),
        "best_checkpoint": best_path,
        "latest_checkpoint": str(latest_dir) if local else result.checkpoint.path,
        "epochs": state.epoch,
        "steps": state.global_step,
        "steps_per_epoch": steps_per_epoch,
        "wall_s": round(wall_s, 1),
    }
    stop = interruption(cfg, state, stopped_by)
    if stop is not None:
        summary["interrupted"] = stop
    if not local:
        shutil.rmtree(staging, ignore_errors=True)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    return summary
