"""Does the debug config ground language? Train it, then the same run with shuffled expressions.

    python bench/learning.py [--out runs/bench_learning] [--minutes 15] [--skip-control] [key=value ...]

Prints the val mIoU / oIoU curve (epoch, wall seconds) of both runs and ends with
``ratio=<control best mIoU / real best mIoU>``, both taken within ``--minutes`` of wall time (the
issue's goal: real >= 0.85 within 15 minutes, ratio <= 0.5).
The control pairs every image with an expression of a different ref (data.shuffle_expressions=true),
so a model that only finds salient shapes scores well there too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(name: str, out: Path, overrides: list[str]) -> list[dict]:
    from refseg.config import load_config
    from refseg.train import run_training

    cfg = load_config(REPO / "configs" / "debug.yaml", overrides)
    t0 = time.time()
    summary = run_training(cfg, out / name)
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    print(f"\n== {name}: best {summary['best']}  wall {time.time() - t0:.0f}s")
    print("epoch  wall_s  val_mIoU  val_oIoU  P@0.5   P@0.9   loss    samples/s")
    for r in rows:
        if "val_miou" in r:
            print(f"{r['epoch']:5d}  {r.get('elapsed_s', float('nan')):6.0f}  {r['val_miou']:.4f}    "
                  f"{r['val_oiou']:.4f}    {r['val_prec_50']:.3f}   {r['val_prec_90']:.3f}   {r['loss']:.4f}  "
                  f"{r['samples_per_s']:.1f}")
    return rows


def best_within(rows: list[dict], minutes: float) -> float:
    """Best val mIoU among the epochs that ended within ``minutes`` of the run's start."""
    scored = [r["val_miou"] for r in rows if "val_miou" in r and r.get("elapsed_s", 0.0) <= minutes * 60]
    return max(scored, default=0.0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(REPO / "runs" / "bench_learning"))
    p.add_argument("--skip-control", action="store_true")
    p.add_argument("--minutes", type=float, default=15.0, help="wall budget the best mIoU is taken within")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    out = Path(a.out).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    real = run(f"real-{stamp}", out, a.overrides)
    best_real = best_within(real, a.minutes)
    if a.skip_control:
        print(f"real best mIoU={best_real:.4f}")
        return
    control = run(f"shuffled-{stamp}", out, [*a.overrides, "data.shuffle_expressions=true"])
    best_control = best_within(control, a.minutes)
    print(f"real best mIoU={best_real:.4f} shuffled best mIoU={best_control:.4f} "
          f"ratio={best_control / max(best_real, 1e-9):.3f}")


if __name__ == "__main__":
    main()
