"""After fit(): consolidate the model, write summary.json, metrics.jsonl and curves.png."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from refseg.config import Config, config_from_dict, load_yaml

CKPT_TAG = "ckpt"
STATE_FILE = "refseg_state.json"


def export_checkpoint(ckpt_dir: str | Path, out_path: str | Path) -> Path:
    """DeepSpeed checkpoint dir (any ZeRO stage) -> ``model.pt`` (fp32 weights + resolved config).

    The file loads with ``refseg.models.export.load_model`` — no DeepSpeed or Ray needed.
    """
    import torch

    from refseg.models import build_model
    from refseg.models.export import save_model

    ckpt_dir = Path(ckpt_dir)
    cfg = config_from_dict(load_yaml(ckpt_dir / "config.yaml"))
    if cfg.deepspeed.zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=CKPT_TAG)
    else:
        states = torch.load(ckpt_dir / CKPT_TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)
        state = states["module"]
    model = build_model(cfg.model, pretrained=False)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers_only = all(k.endswith(("num_batches_tracked",)) for k in missing)
    if unexpected or not buffers_only:
        raise RuntimeError(f"checkpoint {ckpt_dir} does not match the model: missing={missing[:5]} "
                           f"unexpected={unexpected[:5]}")
    out_path = Path(out_path)
    save_model(out_path, model.float(), cfg.to_dict())
    return out_path


def _materialize(checkpoint, dest: Path) -> Path:
    """Copy a Ray Checkpoint (local or remote storage) to ``dest``."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.to_directory(str(dest))
    return dest


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [h["loss"] for h in history], marker="o")
    a.set(xlabel="epoch", ylabel="train loss (BCE + Dice)", title="loss")
    val = [h for h in history if "val_oiou" in h]
    if val:
        b.plot([h["epoch"] for h in val], [h["val_oiou"] for h in val], marker="o", label="val oIoU")
        b.plot([h["epoch"] for h in val], [h["val_miou"] for h in val], marker="s", label="val mIoU")
        b.legend()
    b.set(xlabel="epoch", ylabel="IoU", title="validation", ylim=(0, 1))
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _local_checkpoints(out: Path, keep: int) -> tuple[Path, Path | None, list[dict]]:
    """Local mode: prune to best-K by val oIoU + latest; return (latest, best, history)."""
    ckpts = sorted((out / "checkpoints").glob("epoch_*"))
    latest = ckpts[-1]
    history = json.loads((latest / STATE_FILE).read_text())["history"]
    by_epoch = {h["epoch"]: h for h in history}
    scored = [c for c in ckpts if "val_oiou" in by_epoch.get(int(c.name.split("_")[1]), {})]
    scored.sort(key=lambda c: by_epoch[int(c.name.split("_")[1])]["val_oiou"], reverse=True)
    best = scored[0] if scored else None
    for c in ckpts:
        if c != latest and c not in scored[: max(1, keep)]:
            shutil.rmtree(c, ignore_errors=True)
    return latest, best, history


def write_outputs(cfg: Config, out: Path, result, *, local: bool, steps_per_epoch: int, wall_s: float) -> dict:
    """Write summary.json, metrics.jsonl, curves.png and model.pt; return the summary."""
    if local:
        latest_dir, best_dir, history = _local_checkpoints(out, cfg.train.keep_checkpoints)
        best_path = str(best_dir or latest_dir)
    else:
        staging = Path(tempfile.mkdtemp(prefix="refseg-export-"))
        latest_dir = _materialize(result.checkpoint, staging / "latest")
        history = json.loads((latest_dir / STATE_FILE).read_text())["history"]
        best_ckpt = result.checkpoint
        if cfg.train.val_every and result.best_checkpoints:
            scored = [(c, m) for c, m in result.best_checkpoints if "val_oiou" in m]
            if scored:
                best_ckpt = max(scored, key=lambda cm: cm[1]["val_oiou"])[0]
        best_dir = latest_dir if best_ckpt.path == result.checkpoint.path else _materialize(
            best_ckpt, staging / "best")
        best_path = best_ckpt.path
    _atomic_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    _plot(history, out / "curves.png")
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
    _atomic_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary
