"""After fit(): pick the checkpoint to export, write metrics.jsonl, curves.png, model.pt and summary.json."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from refseg.config import Config
from refseg.io import new_figure, save_figure_atomic, write_text_atomic
from refseg.train.checkpoint import LOCAL_CHECKPOINTS, export_checkpoint, read_state


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


def _local_checkpoints(out: Path, keep: int) -> tuple[Path, Path | None, list[dict]]:
    """Local mode: prune to best-K by val oIoU + latest; return (latest, best, history)."""
    ckpts = sorted((out / LOCAL_CHECKPOINTS).glob("epoch_*"))
    latest = ckpts[-1]
    history = read_state(latest).history
    by_epoch = {h["epoch"]: h for h in history}
    scored = [c for c in ckpts if "val_oiou" in by_epoch.get(int(c.name.split("_")[1]), {})]
    scored.sort(key=lambda c: by_epoch[int(c.name.split("_")[1])]["val_oiou"], reverse=True)
    best = scored[0] if scored else None
    for c in ckpts:
        if c != latest and c not in scored[: max(1, keep)]:
            shutil.rmtree(c, ignore_errors=True)
    return latest, best, history


def write_outputs(cfg: Config, out: Path, result, *, local: bool, steps_per_epoch: int, wall_s: float) -> dict:
    """Write metrics.jsonl, curves.png, model.pt (from the best checkpoint by val oIoU, else the latest)
    and summary.json into ``out``; return the summary."""
    if local:
        latest_dir, best_dir, history = _local_checkpoints(out, cfg.train.keep_checkpoints)
        best_path = str(best_dir or latest_dir)
    else:
        staging = Path(tempfile.mkdtemp(prefix="refseg-export-"))
        latest_dir = _materialize(result.checkpoint, staging / "latest")
        history = read_state(latest_dir).history
        best_ckpt = result.checkpoint
        if cfg.train.val_every and result.best_checkpoints:
            scored = [(c, m) for c, m in result.best_checkpoints if "val_oiou" in m]
            if scored:
                best_ckpt = max(scored, key=lambda cm: cm[1]["val_oiou"])[0]
        best_dir = latest_dir if best_ckpt.path == result.checkpoint.path else _materialize(
            best_ckpt, staging / "best")
        best_path = best_ckpt.path
    write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    plot_curves(history, out / "curves.png")
    model_path = export_checkpoint(best_dir or latest_dir, out / "model.pt")
    val = [h for h in history if "val_oiou" in h]
    best = max(val, key=lambda h: h["val_oiou"]) if val else None
    final = history[-1]
    summary = {
        "best": {"oiou": best["val_oiou"], "miou": best["val_miou"], "epoch": best["epoch"]} if best else None,
        "final": {k: final[k] for k in ("epoch", "loss", "val_oiou", "val_miou") if k in final},
        "model_path": str(model_path),
        "best_checkpoint": best_path,
        "latest_checkpoint": str(latest_dir) if local else result.checkpoint.path,
        "epochs": final["epoch"],
        "steps": final["step"],
        "steps_per_epoch": steps_per_epoch,
        "wall_s": round(wall_s, 1),
    }
    if not local:
        shutil.rmtree(staging, ignore_errors=True)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    return summary
