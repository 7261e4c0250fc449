"""Batch evaluation of a checkpoint on a refer-format split, with Ray Data actors.

    metrics = evaluate("runs/debug/model.pt", "data", "refcoco", "unc", "val", workers=2, output="runs/eval")

Every sentence of every ref is one sample. Each actor decodes the image, runs the model, warps the
probabilities back to the ORIGINAL image size (bilinear), thresholds them (``prob > threshold``) and
compares with the ground truth decoded at the original size; it returns per-sample integer areas only
(intersection, union, predicted and ground-truth area), aggregated with :class:`SegMetrics`, so the
numbers never depend on the number of actors or the order results arrive in. ``at_train_res`` adds
LAVT's convention (GT resized NEAREST to the training resolution, prediction at that resolution).

Outputs in ``output``: metrics.json, per_sample.jsonl (sorted by ref_id, sent_id) and, with
``save_masks``, masks/<ref_id>_<sent_id>.png (255 = object, original size).

A sample whose image or mask cannot be used is counted in ``metrics.json["skipped"]`` under its
:mod:`refseg.data.skips` reason, never scored.

Generalized data (``dataset`` in GENERALIZED_DATASETS, gRefCOCO) is scored with
:class:`refseg.metrics.GresMetrics`: metrics.json holds giou, ciou, n_acc, t_acc, precision_at (0.7 /
0.8 / 0.9 over target samples), num_samples, num_target and num_no_target; a no-target record's ground
truth is an empty mask. A sample is predicted no-target when its predicted mask is empty (GRES: a
prediction without any foreground pixel), which the no-target head forces when it says so (see
:class:`refseg.infer.predictor.Predictor`); its saved mask is then all zero. per_sample.jsonl adds
gt_no_target, pred_no_target and no_target_prob, and its intersection / union / iou are the GRES-scored
ones (they sum to cIoU's numerator and denominator).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from refseg.config import ConfigError
from refseg.config.schema import GENERALIZED_DATASETS
from refseg.data.skips import INVALID_SEGMENTATION, SIZE_MISMATCH, UNREADABLE_IMAGE, SkipSample
from refseg.infer.batch import actor_pool, check_batch_args, predictor_from_box, ship_checkpoint
from refseg.io import write_text_atomic
from refseg.progress import Progress
from refseg.runtime import init_ray

log = logging.getLogger("refseg.infer")

AREA_COLUMNS = ("intersection", "union", "pred_area", "gt_area")


# ----------------------------------------------------------------------------- the actor
class EvalActor:
    """Ray Data callable class: a batch of records -> per-sample areas (see the module docstring)."""

    def __init__(self, box: list, threshold: float, at_train_res: bool, masks_dir: str | None,
                 compile: bool = False) -> None:
        self.predictor = predictor_from_box(box, compile)
        self.threshold, self.at_train_res = threshold, at_train_res
        self.masks_dir = Path(masks_dir) if masks_dir else None

    def _load(self, batch: dict, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (h, w, 3) uint8, GT (H, W) uint8; all zero for a no-target record); raises SkipSample."""
        from refseg.data.masks import decode_mask
        from refseg.data.samples import is_draft_size
        from refseg.data.transforms import ImageError, load_image

        h, w = int(batch["height"][i]), int(batch["width"][i])
        try:
            if batch["no_target"][i]:
                gt = np.zeros((h, w), np.uint8)
            else:
                gt = decode_mask(json.loads(str(batch["seg_json"][i])), h, w)
        except (ValueError, TypeError, KeyError) as e:
            raise SkipSample(INVALID_SEGMENTATION, str(e)) from None
        try:  # COCO masks live on the stored pixel grid: no EXIF rotation; every pixel decoded, as validation
            image = load_image(str(batch["image_path"][i]), exif=False)  # and the Predictor do (no JPEG draft)
        except (ImageError, OSError) as e:
            raise SkipSample(UNREADABLE_IMAGE, str(e)) from None
        if not is_draft_size(gt.shape, image.shape[:2]):
            raise SkipSample(SIZE_MISMATCH, f"{batch['image_path'][i]}: image {image.shape[:2]}, mask {gt.shape}")
        return image, gt

    def __call__(self, batch: dict) -> dict:
        from refseg.data.transforms import preprocess_with_meta

        p, n = self.predictor, len(batch["ref_id"])
        cols = {k: np.zeros(n, np.int64) for k in AREA_COLUMNS}
        pred_nt, nt_prob = np.zeros(n, bool), np.full(n, np.nan, np.float32)
        if self.at_train_res:
            cols.update({f"{k}_tr": np.zeros(n, np.int64) for k in AREA_COLUMNS})
            cols["pred_no_target_tr"] = np.zeros(n, bool)  # GRES at the training resolution: that mask's emptiness
        reasons = [""] * n
        good, xs, metas, gts, gts_small = [], [], [], [], []
        for i in range(n):
            try:
                image, gt = self._load(batch, i)
            except SkipSample as e:
                reasons[i] = e.reason
                log.warning("skipping ref %s sent %s: %s", batch["ref_id"][i], batch["sent_id"][i], e.detail)
                continue
            x, small, meta = preprocess_with_meta(image, gt if self.at_train_res else None, p.image_size,
                                                  p.keep_aspect, orig_size=gt.shape)
            good.append(i), xs.append(x), metas.append(meta), gts.append(gt), gts_small.append(small)
        if good:
            probs, _, no_target = p.forward(np.stack(xs), [str(batch["sentence"][i]) for i in good],
                                            return_no_target=True)
            for j, i in enumerate(good):
                mask, _ = p.finish(probs[j], metas[j], self.threshold)  # empty when the head says no-target
                pred_nt[i] = not mask.any()  # GRES: a prediction without a foreground pixel says "no target"
                if no_target is not None:
                    nt_prob[i] = no_target[j]
                self._record(cols, "", i, mask, gts[j])
                if self.at_train_res:
                    rh, rw = metas[j]["resized_h"], metas[j]["resized_w"]
                    small = probs[j][:rh, :rw] > self.threshold
                    cols["pred_no_target_tr"][i] = not small.any()
                    self._record(cols, "_tr", i, small, gts_small[j][:rh, :rw])
                if self.masks_dir is not None:
                    from refseg.infer.visualize import mask_png, save_png

                    save_png(mask_png(mask), self.masks_dir / f"{int(batch['ref_id'][i])}_{int(batch['sent_id'][i])}.png")
        return {"ref_id": np.asarray(batch["ref_id"], np.int64), "sent_id": np.asarray(batch["sent_id"], np.int64),
                "reason": np.asarray(reasons, dtype=object), "gt_no_target": np.asarray(batch["no_target"], bool),
                "pred_no_target": pred_nt, "no_target_prob": nt_prob, **cols}

    @staticmethod
    def _record(cols: dict, suffix: str, i: int, pred: np.ndarray, gt: np.ndarray) -> None:
        from refseg.metrics import intersection_union

        inter, union = intersection_union(pred, gt)
        cols[f"intersection{suffix}"][i], cols[f"union{suffix}"][i] = inter[0], union[0]
        cols[f"pred_area{suffix}"][i] = np.count_nonzero(pred)
        cols[f"gt_area{suffix}"][i] = np.count_nonzero(gt)


# ----------------------------------------------------------------------------- the driver
def _items(records: list[dict]) -> list[dict]:
    """Arrow-friendly rows (the segmentation, polygons or RLE, travels as a JSON string)."""
    return [{"ref_id": int(r["ref_id"]), "sent_id": int(r["sent_id"]), "image_path": str(r["image_path"]),
             "sentence": str(r["sentence"]), "height": int(r["height"]), "width": int(r["width"]),
             "seg_json": json.dumps(r.get("segmentation")), "no_target": bool(r.get("no_target", False))}
            for r in records]


def _accumulate(rows: dict, suffix: str, generalized: bool):
    """The scored samples' SegMetrics (GresMetrics on generalized data) from the actors' columns."""
    from refseg.metrics import GresMetrics, SegMetrics

    ok = rows["reason"] == ""
    areas = [rows[f"{k}{suffix}"][ok] for k in AREA_COLUMNS]
    if not generalized:
        m = SegMetrics()
        m.add(*areas, keys=rows["sent_id"][ok])
        return m
    m = GresMetrics()
    m.add(*areas, rows["gt_no_target"][ok], rows[f"pred_no_target{suffix}"][ok], keys=rows["sent_id"][ok])
    return m


def run_eval_pipeline(records: list[dict], box: list, *, workers: int, batch_size: int, threshold: float,
                      at_train_res: bool, masks_dir: Path | None, compile: bool = False) -> dict:
    """Ray Data: records -> EvalActor pool -> columns of all samples, sorted by (ref_id, sent_id)."""
    kwargs = {"box": box, "threshold": threshold, "at_train_res": at_train_res,
              "masks_dir": str(masks_dir) if masks_dir else None, "compile": compile}
    ds = actor_pool(EvalActor, _items(records), kwargs, workers=workers, batch_size=batch_size)
    parts = []
    with Progress("evaluate", total=len(records), unit="samples") as bar:
        for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
            parts.append(part)
            bar.update(len(part["ref_id"]))
    cols = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]} if parts else {}
    order = np.lexsort((cols["sent_id"], cols["ref_id"]))
    return {k: v[order] for k, v in cols.items()}


def evaluate(checkpoint: str | os.PathLike, data_root: str | os.PathLike, dataset: str, split_by: str,
             split: str, *, image_dir: str | None = None, workers: int = 1, batch_size: int = 16,
             threshold: float = 0.5, save_masks: bool = False, at_train_res: bool = False,
             output: str | os.PathLike, address: str | None = None, compile: bool = False) -> dict:
    """Score ``checkpoint`` on every (ref, sentence) of ``split``; writes and returns metrics.json."""
    from refseg.data.skips import RefSegDataError, SkipReport
    from refseg.data.sources.refer import check_data_root, load_split

    t0 = time.time()
    report = SkipReport()
    try:
        check_batch_args(checkpoint, output, workers, batch_size, threshold)
        check_data_root(data_root, dataset, split_by, image_dir)
        records = load_split(data_root, dataset, split_by, split, image_dir=image_dir, report=report)
    except RefSegDataError as e:
        raise ConfigError(str(e)) from None
    out = Path(output).expanduser().resolve()
    if not records:
        raise ConfigError(f"{dataset}({split_by}) split '{split}' under '{data_root}' has no usable samples; "
                          f"check --split and --data-root ({report.summary()})")
    init_ray(address)
    box, cfg = ship_checkpoint(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    masks_dir = out / "masks" if save_masks else None
    if masks_dir is not None:
        masks_dir.mkdir(exist_ok=True)
    cols = run_eval_pipeline(records, box, workers=workers, batch_size=batch_size, threshold=threshold,
                             at_train_res=at_train_res, masks_dir=masks_dir, compile=compile)

    for reason in cols["reason"]:  # samples the actors could not use
        if reason:
            report.add(str(reason))
    generalized = dataset in GENERALIZED_DATASETS
    scores = _accumulate(cols, "", generalized)
    metrics = {**scores.compute(), "resolution": "original", "threshold": threshold,
               "checkpoint": str(checkpoint), "dataset": dataset, "split_by": split_by, "split": split}
    if at_train_res:
        size = cfg.data.image_size
        metrics["at_train_res"] = {**_accumulate(cols, "_tr", generalized).compute(),
                                   "resolution": f"train ({size}x{size}, GT resized nearest)"}
    metrics["skipped"] = dict(report.counts)
    metrics["wall_s"] = round(time.time() - t0, 2)
    sentences = {(r["ref_id"], r["sent_id"]): r["sentence"] for r in records}
    _write_per_sample(out / "per_sample.jsonl", cols, sentences, scores if generalized else None)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1, ensure_ascii=False) + "\n")
    return metrics


def _write_per_sample(path: Path, cols: dict, sentences: dict, gres=None) -> None:
    """One JSON line per scored sample; with ``gres`` (the split's GresMetrics, in the same order) the
    GRES-scored intersection / union / iou and the no-target flags and probability."""
    ok = np.flatnonzero(cols["reason"] == "")
    if gres is None:
        inters, unions = cols["intersection"][ok], cols["union"][ok]
        ious = [int(i) / int(u) if u else 0.0 for i, u in zip(inters, unions)]
    else:
        inters, unions, ious = gres.scored()
    lines = []
    for j, i in enumerate(ok):
        key = (int(cols["ref_id"][i]), int(cols["sent_id"][i]))
        row = {"ref_id": key[0], "sent_id": key[1], "sentence": sentences[key], "intersection": int(inters[j]),
               "union": int(unions[j]), "iou": float(ious[j])}
        if gres is not None:
            prob = float(cols["no_target_prob"][i])
            row.update(gt_no_target=bool(cols["gt_no_target"][i]), pred_no_target=bool(cols["pred_no_target"][i]),
                       no_target_prob=None if np.isnan(prob) else prob)
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    write_text_atomic(path, "".join(lines))


def format_summary(m: dict) -> str:
    """One line for the terminal."""
    p = m["precision_at"]
    skipped = sum(m["skipped"].values())
    if "giou" in m:
        return (f"{m['split']}: gIoU {m['giou']:.4f}  cIoU {m['ciou']:.4f}  N-acc {m['n_acc']:.4f}  "
                f"T-acc {m['t_acc']:.4f}  Pr@0.9 {p['0.9']:.4f}  ({m['num_samples']} samples, "
                f"{m['num_no_target']} no-target, at original resolution, {skipped} skipped)")
    line = (f"{m['split']}: oIoU {m['oiou']:.4f}  mIoU {m['miou']:.4f}  P@0.5 {p['0.5']:.4f}  P@0.9 {p['0.9']:.4f}"
            f"  ({m['num_samples']} samples at original resolution, {skipped} skipped)")
    if "at_train_res" in m:
        line += f"; at train res oIoU {m['at_train_res']['oiou']:.4f} mIoU {m['at_train_res']['miou']:.4f}"
    return line
