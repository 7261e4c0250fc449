"""`refseg demo`: synthetic RefCOCO-format data -> Ray Train + DeepSpeed -> evaluation -> overlays.

A shorter schedule than configs/debug.yaml so a fresh 2-core machine finishes in minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

from refseg.config import load_config, shipped_path

DEMO_OVERRIDES = ["train.epochs=12", "train.val_every=3", "train.checkpoint_every=3"]


def run_demo(output_dir: str | Path, data_root: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Run the whole pipeline into ``output_dir`` (train/, eval/, overlays/); return a summary."""
    from refseg.data import ensure_synthetic, load_split
    from refseg.infer import Predictor, evaluate
    from refseg.train import run_training

    out = Path(output_dir).expanduser().resolve()
    root = Path(data_root).expanduser().resolve() if data_root else out / "data"
    cfg = load_config(shipped_path("configs", "debug", "config"), [f"data.root={root}", *DEMO_OVERRIDES, *(overrides or [])])
    print(f"[demo] synthetic RefCOCO-format set at {root}")
    ensure_synthetic(root, cfg.data.synthetic_images, cfg.data.synthetic_seed)

    print(f"[demo] training the tiny model: {cfg.train.num_workers} Ray Train workers, "
          f"DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}, {cfg.train.precision}")
    done = out / "train" / "summary.json"
    summary = json.loads(done.read_text()) if done.exists() else None
    if summary is None or "interrupted" in summary:  # not trained yet, or stopped early: (re)start or continue
        summary = run_training(cfg, out / "train", resume=(out / "train" / "run.json").exists())

    print("[demo] evaluating model.pt on the val split at original resolution (Ray Data actors)")
    metrics = evaluate(summary["model_path"], root, cfg.data.dataset, cfg.data.split_by, cfg.data.val_split,
                       workers=1, output=out / "eval", save_masks=False)

    print("[demo] writing overlays for a few val expressions")
    predictor = Predictor.from_checkpoint(summary["model_path"])
    overlays = out / "overlays"
    overlays.mkdir(parents=True, exist_ok=True)
    records = load_split(root, cfg.data.dataset, cfg.data.split_by, cfg.data.val_split)[:6]
    for r in records:
        predictor.visualize(r["image_path"], r["sentence"], overlays / f"{r['ref_id']}_{r['sent_id']}.png")
    result = {"train": summary, "eval": {k: metrics[k] for k in ("oiou", "miou", "num_samples")},
              "overlays": str(overlays)}
    print(json.dumps(result, indent=1))
    return result
