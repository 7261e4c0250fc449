"""Batch segmentation throughput: `refseg segment` with 1 vs 2 Ray Data actors, same images, same run.

    python bench/segment.py                         # 300 synthetic images, tiny model at 128 px
    python bench/segment.py --images 100 --image-size 64 --batch-size 8

A synthetic refer-format set provides the images (JPEG, sides 96-192 px) and their expressions; a
tiny model (random init, seed 0) is saved with ``data.image_size = --image-size``. Each worker count
runs ``refseg.infer.segment`` end to end into a fresh output dir (actor start-up, model load, decode,
forward, warp back, PNG writes, results.jsonl). Besides the end-to-end rate, the steady-state rate
counts the rows finished after EVERY actor has returned its first batch, over the time since then
(actor start-up and model load excluded; ``steady_images_per_s`` of the summary). On a 2-core machine the driver and Ray share
the cores with the actors, so 2 actors cannot reach 2x. The last line is
``... ratio=<2 actors / 1 actor>`` of the steady-state rates.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_inputs(work: Path, images: int, image_size: int) -> tuple[Path, Path]:
    """(checkpoint, manifest with one row per image)."""
    import torch

    from refseg.config import config_from_dict
    from refseg.data import load_split, make_synthetic
    from refseg.models import build_model
    from refseg.models.export import save_model

    root = make_synthetic(work / "data", num_images=images, seed=0)
    rows, seen = [], set()
    for split in ("train", "val", "testA", "testB"):
        for r in load_split(root, "refcoco", "unc", split):
            if r["image_path"] not in seen:  # one row per image
                seen.add(r["image_path"])
                rows.append({"id": f"img{r['image_id']}", "image": r["image_path"], "text": r["sentence"]})
    manifest = work / "rows.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config_from_dict({"model": {"preset": "tiny"}, "data": {"image_size": image_size}})
    torch.manual_seed(0)
    ckpt = save_model(work / "model.pt", build_model(cfg.model, pretrained=False).eval(), cfg.to_dict())
    return ckpt, manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", default="1,2", help="comma-separated actor counts; ratio = last / first")
    a = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.data

    from refseg.infer import segment

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             object_store_memory=300 * 1024**2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False
    counts = [int(w) for w in a.workers.split(",")]
    rates = {}
    with tempfile.TemporaryDirectory(prefix="refseg-bench-") as tmp:
        work = Path(tmp)
        ckpt, manifest = make_inputs(work, a.images, a.image_size)
        n = sum(1 for _ in manifest.open())
        print(f"segment bench: {n} images (96-192 px JPEG), tiny model at {a.image_size} px, "
              f"batch {a.batch_size}, 2 CPUs, torch threads per actor = 1")
        for w in counts:
            s = segment(ckpt, manifest, work / f"out{w}", workers=w, batch_size=a.batch_size)
            assert s["segmented"] == n and s["exit_code"] == 0, s
            rates[w] = s["steady_images_per_s"]
            print(f"  {w} actor{'s' if w > 1 else ' '}: {s['images_per_s']:6.1f} images/s end to end "
                  f"({s['wall_s']:5.1f} s), steady state {rates[w]:6.1f} images/s")
    ray.shutdown()
    first, last = counts[0], counts[-1]
    print(f"segment throughput {last} actors vs {first}: {rates[last]:.1f} vs {rates[first]:.1f} images/s "
          f"ratio={rates[last] / rates[first]:.2f}")


if __name__ == "__main__":
    main()
