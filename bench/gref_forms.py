"""Where a gRefCOCO model's score goes on the synthetic generalized set: per sample kind and per
expression form (issue 21's diagnosis, BENCHMARKS.md "gRefCOCO", session 16).

    python bench/gref_forms.py runs/debug_grefcoco                       # a run dir, model.pt or artifact
    python bench/gref_forms.py runs/debug_grefcoco --split val --top 30 --data-root data/synthetic_grefcoco

Every (ref, sentence) of the split goes once through ``Predictor`` with the head's clearing off (the
decoder's own mask and the head's probability); the shipped prediction is that mask cleared where the
probability exceeds ``model.no_target_threshold``, as ``Predictor`` does. Printed:

- per kind (one-target / multi-target / no-target): how often the head says "no target", how often the
  shipped mask is empty (= a no-target prediction under GRES), how often the decoder's own mask is
  empty, and the GRES IoU of each sample (no-target: 1 if predicted empty, else 0);
- the head's ranking, threshold-free: the AUC of its probability (no-target vs target samples: the share
  of (no-target, target) pairs it ranks the right way round, ties half) -- what tells a better head from
  a shifted one -- and, as a diagnosis only (never a setting: it is fitted on the split it scores), the
  best T-acc any threshold reaches with N-acc >= 0.85 (issue 21's floor);
- per expression form of the target samples (colour words -> ``C``, shape words -> ``S``; the synthetic
  vocabulary of ``refseg.data.sources.synthetic_expressions``): count, mean IoU of the decoder's mask,
  mean ground-truth area share. On the synthetic set this separates "tells colours apart" from "tells
  shapes apart" ("the C object" vs "the S").

IoU is measured at the image's original size (as ``refseg evaluate``), so figures differ slightly from the
96 px validation of training.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def form(sentence: str, colors: list[str], shapes: list[str]) -> str:
    """'the red circle on the left' -> 'the C S on the left'."""
    s = re.sub(r"\b(" + "|".join(colors) + r")\b", "C", sentence)
    return re.sub(r"\b(" + "|".join(shapes) + r")s?\b", "S", s)


def head_ranking(prob: np.ndarray, no_target: np.ndarray, min_n_acc: float = 0.85) -> tuple[float, float | None]:
    """(AUC of ``prob`` for no-target vs target, best T-acc over thresholds with N-acc >= ``min_n_acc``;
    None without both kinds). A sample is called no-target when its probability exceeds the threshold."""
    pos, neg = prob[no_target], prob[~no_target]
    if not len(pos) or not len(neg):
        return float("nan"), None
    auc = float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())
    cuts = np.concatenate([[-1.0], np.unique(prob)])
    best = [float((neg <= t).mean()) for t in cuts if (pos > t).mean() >= min_n_acc]
    return auc, max(best) if best else None


def main(argv: list[str] | None = None) -> dict:
    """Prints the tables; returns {"auc", "best_t_acc" (see :func:`head_ranking`), "prob", "no_target": (n,)
    per sample, "kinds": {kind: (n, 4) array of (head, empty, decoder empty, IoU)},
    "forms": {form: (n, 2) array of (decoder IoU, gt area share)}}."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="run dir, model.pt, DeepSpeed checkpoint dir or artifact folder")
    ap.add_argument("--data-root", default=str(REPO / "data" / "synthetic_grefcoco"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--top", type=int, default=25, help="expression forms to print (most frequent first)")
    args = ap.parse_args(argv)

    from refseg.data import decode_mask, load_split
    from refseg.data.sources.synthetic_expressions import COLORS, SHAPES
    from refseg.infer import Predictor
    from refseg.metrics import intersection_union

    def iou(pred: np.ndarray, gt: np.ndarray) -> float:
        i, u = intersection_union(pred, gt)
        return float(i[0] / max(u[0], 1))

    p = Predictor.from_checkpoint(args.checkpoint)
    threshold = p.no_target_threshold
    p.no_target_threshold = 1.0  # sigmoid never exceeds 1: the head clears nothing, the decoder's own mask
    recs = load_split(args.data_root, "grefcoco", "unc", args.split)
    kinds: dict[str, list[tuple[bool, bool, bool, float]]] = defaultdict(list)
    forms: dict[str, list[tuple[float, float]]] = defaultdict(list)
    probs: list[tuple[float, bool]] = []  # (head probability, no-target)
    for start in range(0, len(recs), args.batch):
        rs = recs[start:start + args.batch]
        own = p.predict_batch([r["image_path"] for r in rs], [r["sentence"] for r in rs])
        if own[0].no_target_prob is None:
            raise SystemExit(f"{args.checkpoint}: this model has no no-target head (model.no_target_head=false).")
        for r, o in zip(rs, own):
            gt = decode_mask(r) > 0
            # as shipped, Predictor clears the decoder's mask where the head's probability exceeds the threshold
            head, own_empty = o.no_target_prob > threshold, not o.mask.any()
            empty = head or own_empty
            probs.append((o.no_target_prob, bool(r["no_target"])))
            if r["no_target"]:
                kinds["no-target"].append((head, empty, own_empty, float(empty)))
                continue
            own_iou = iou(o.mask, gt)
            kind = "multi" if len(r["ann_ids"]) > 1 else "one"
            kinds[f"{kind}-target"].append((head, empty, own_empty, 0.0 if head else own_iou))
            forms[f"{kind:5s} {form(r['sentence'], list(COLORS), list(SHAPES))}"].append((own_iou, float(gt.mean())))

    print(f"{args.checkpoint}: {args.split}, {len(recs)} samples, no_target_threshold {threshold}")
    print(f"{'kind':13s} {'n':>5s} {'head says empty':>16s} {'mask empty':>11s} {'decoder mask empty':>19s} {'GRES IoU':>9s}")
    for kind in ("one-target", "multi-target", "no-target"):
        a = np.asarray(kinds.get(kind, []), dtype=float).reshape(-1, 4)
        if len(a):
            print(f"{kind:13s} {len(a):5d} {a[:, 0].mean():16.3f} {a[:, 1].mean():11.3f} {a[:, 2].mean():19.3f} "
                  f"{a[:, 3].mean():9.3f}")
    prob = np.asarray([q for q, _ in probs])
    no_target = np.asarray([nt for _, nt in probs], dtype=bool)
    auc, best = head_ranking(prob, no_target)
    print(f"\nhead: AUC {auc:.4f} (no-target vs target); best T-acc at N-acc >= 0.85 over thresholds: "
          f"{'none' if best is None else f'{best:.3f}'} (a diagnosis, fitted on this split)")
    print(f"\n{'n':>5s} {'IoU':>6s} {'gt area':>8s}  form (target samples, the decoder's own mask)")
    for name, v in sorted(forms.items(), key=lambda kv: -len(kv[1]))[: args.top]:
        a = np.asarray(v)
        print(f"{len(a):5d} {a[:, 0].mean():6.3f} {a[:, 1].mean():8.3f}  {name}")
    return {"auc": auc, "best_t_acc": best, "prob": prob, "no_target": no_target,
            "kinds": {k: np.asarray(v, dtype=float).reshape(-1, 4) for k, v in kinds.items()},
            "forms": {k: np.asarray(v, dtype=float) for k, v in forms.items()}}


if __name__ == "__main__":
    main()
