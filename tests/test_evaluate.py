"""`refseg evaluate`: metrics equal an independent recomputation from the saved masks; 1 vs 2 actors agree;
unreadable images are skipped and counted."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_predictor import IMAGE_SIZE, tiny_checkpoint

SPLIT = ("refcoco", "unc", "val")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def one_worker(ray_session, ckpt, synthetic_root, tmp_path_factory) -> Path:
    """`refseg evaluate` through the CLI, 1 actor, masks saved, LAVT block on."""
    from refseg.cli import main

    out = tmp_path_factory.mktemp("eval1")
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--data-root", str(synthetic_root), "--dataset", SPLIT[0],
               "--split-by", SPLIT[1], "--split", SPLIT[2], "--workers", "1", "--batch-size", "8",
               "--save-masks", "--at-train-res", "--output", str(out)])
    assert rc == 0
    return out


def _numbers(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("checkpoint", "wall_s")}


def test_metrics_equal_recomputation_from_saved_masks(one_worker, synthetic_root, ckpt):
    from refseg.data import decode_mask, load_split
    from refseg.metrics import SegMetrics

    metrics = json.loads((one_worker / "metrics.json").read_text())
    records = load_split(synthetic_root, *SPLIT)
    assert metrics["num_samples"] == len(records) > 0
    assert metrics["resolution"] == "original" and metrics["split"] == "val" and metrics["skipped"] == {}
    assert metrics["checkpoint"] == str(ckpt)

    ref = SegMetrics()
    expected_rows = []
    for r in sorted(records, key=lambda r: (r["ref_id"], r["sent_id"])):
        pred = np.asarray(Image.open(one_worker / "masks" / f"{r['ref_id']}_{r['sent_id']}.png")) > 0
        gt = decode_mask(r)
        assert pred.shape == gt.shape == (r["height"], r["width"])  # ORIGINAL size
        ref.update(pred, gt)
        inter, union = int((pred & (gt > 0)).sum()), int((pred | (gt > 0)).sum())
        expected_rows.append({"ref_id": r["ref_id"], "sent_id": r["sent_id"], "sentence": r["sentence"],
                              "intersection": inter, "union": union, "iou": inter / union if union else 0.0})
    want = ref.compute()
    for key in ("oiou", "miou", "median_iou", "dice", "mean_precision", "mean_recall", "num_samples"):
        assert metrics[key] == pytest.approx(want[key], abs=1e-12), key
    assert metrics["precision_at"] == pytest.approx(want["precision_at"], abs=1e-12)
    assert 0.0 < metrics["oiou"] < 1.0

    rows = [json.loads(line) for line in (one_worker / "per_sample.jsonl").read_text().splitlines()]
    assert rows == expected_rows  # sorted by (ref_id, sent_id), exact integers

    lavt = metrics["at_train_res"]
    assert lavt["num_samples"] == metrics["num_samples"] and str(IMAGE_SIZE) in lavt["resolution"]
    assert 0.0 <= lavt["oiou"] <= 1.0 and lavt["oiou"] != metrics["oiou"]


def test_at_train_res_block_uses_nearest_resized_gt(one_worker, synthetic_root, ckpt):
    """Recompute the LAVT numbers for a few samples: prediction at 64 px vs GT resized NEAREST."""
    import torch

    from refseg.data import decode_mask, load_image, load_split, preprocess, tokenize
    from refseg.data.transforms import normalize_images
    from refseg.infer import Predictor
    from refseg.metrics import SegMetrics

    p = Predictor.from_checkpoint(ckpt)
    records = sorted(load_split(synthetic_root, *SPLIT), key=lambda r: (r["ref_id"], r["sent_id"]))
    m = SegMetrics()
    for r in records:
        x, gt = preprocess(load_image(r["image_path"], exif=False), decode_mask(r),
                           IMAGE_SIZE, False, orig_size=(r["height"], r["width"]))
        ids, am = tokenize(p.tokenizer, [r["sentence"]], p.max_tokens)
        with torch.inference_mode():
            logits = p.model(normalize_images(torch.from_numpy(x[None])), torch.from_numpy(ids),
                             torch.from_numpy(am))["logits"]
        m.update(torch.sigmoid(logits)[0, 0].numpy() > 0.5, gt)
    want = m.compute()
    got = json.loads((one_worker / "metrics.json").read_text())["at_train_res"]
    # one sample at a time here, batches of 16 in the pipeline: the CPU convolution kernels may
    # differ in the last float bit and flip a boundary pixel or two
    assert got["oiou"] == pytest.approx(want["oiou"], abs=1e-5)
    assert got["miou"] == pytest.approx(want["miou"], abs=1e-5)


@pytest.mark.slow
def test_two_workers_give_identical_metrics(one_worker, ckpt, synthetic_root, tmp_path):
    from refseg.infer import evaluate

    m2 = evaluate(ckpt, synthetic_root, *SPLIT, workers=2, batch_size=8, at_train_res=True, output=tmp_path)
    m1 = json.loads((one_worker / "metrics.json").read_text())
    assert _numbers(m2) == _numbers(m1)
    assert (tmp_path / "per_sample.jsonl").read_text() == (one_worker / "per_sample.jsonl").read_text()


def test_batch_blocks_hold_exactly_one_batch_each():
    """Ray Data gets blocks of exactly batch_size rows, so map_batches(batch_size=...) hands each actor
    whole blocks (batches do not depend on the actor count; GPU actors need an explicit size)."""
    from refseg.infer.batch import batch_blocks

    items = [{"id": i, "text": f"t{i}"} for i in range(37)]
    blocks = batch_blocks(items, 16)
    assert [b.num_rows for b in blocks] == [16, 16, 5]
    assert [r["id"] for b in blocks for r in b.to_pylist()] == list(range(37))
    assert [b.num_rows for b in batch_blocks(items[:32], 16)] == [16, 16]
    assert batch_blocks([], 16) == []


def test_unreadable_image_is_skipped_and_counted(ray_session, ckpt, synthetic_root, tmp_path):
    from refseg.data import load_split
    from refseg.infer import evaluate

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    records = load_split(root, *SPLIT)
    broken = records[0]["image_path"]
    Path(broken).write_bytes(Path(broken).read_bytes()[:200])  # truncated JPEG
    n_broken = sum(r["image_path"] == broken for r in records)
    m = evaluate(ckpt, root, *SPLIT, workers=1, batch_size=8, output=tmp_path / "out")
    assert m["skipped"] == {"unreadable image": n_broken}
    assert m["num_samples"] == len(records) - n_broken
    rows = (tmp_path / "out" / "per_sample.jsonl").read_text().splitlines()
    assert len(rows) == m["num_samples"]


def test_user_errors_exit_2(ray_session, ckpt, synthetic_root, tmp_path, capsys):
    from refseg.cli import main

    base = ["evaluate", "--data-root", str(synthetic_root), "--output", str(tmp_path)]
    assert main([*base, "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert main([*base, "--checkpoint", str(ckpt), "--split", "nosuchsplit"]) == 2
    assert main([*base, "--checkpoint", str(ckpt), "--workers", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("refseg: error: ") for line in err)
    assert "does not exist" in err[0] and "nosuchsplit" in err[1] and "--workers 64" in err[2]


def test_interrupt_is_one_sentence_and_exit_130(ckpt, synthetic_root, tmp_path, monkeypatch, capsys):
    import importlib

    from refseg.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the actors run

    monkeypatch.setattr(importlib.import_module("refseg.infer.evaluate"), "evaluate", interrupted)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data-root", str(synthetic_root),
                 "--output", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err == ("refseg: interrupted: metrics.json not written, re-run the same command to "
                                       "evaluate\n")


# ----------------------------------------------------------------------------- generalized (gRefCOCO)
GSPLIT = ("grefcoco", "unc", "val")


@pytest.fixture(scope="module")
def gres_root(tmp_path_factory) -> Path:
    """A generalized synthetic set (one-, multi- and no-target refs) of 30 images."""
    from refseg.data.sources.synthetic_generalized import make_generalized_synthetic

    return make_generalized_synthetic(tmp_path_factory.mktemp("gsynthetic") / "set", num_images=30, seed=0)


@pytest.fixture(scope="module")
def gres_ckpt(tmp_path_factory, gres_root) -> Path:
    """The tiny model with the no-target head; model.no_target_threshold is set to the median no-target
    probability over the val split, so the random-init head calls about half the samples empty."""
    import torch

    from refseg.config import config_from_dict
    from refseg.data import load_split
    from refseg.infer import Predictor
    from refseg.models import build_model
    from refseg.models.export import save_model

    cfg = config_from_dict({"model": {"preset": "tiny", "no_target_head": True}, "data": {"image_size": IMAGE_SIZE}})
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False).eval()
    torch.nn.init.zeros_(model.decoder.head[0].bias)
    model.no_target.mlp[2].weight.data *= 50  # spread the probabilities
    path = save_model(tmp_path_factory.mktemp("gckpt") / "model.pt", model, cfg.to_dict())
    p = Predictor.from_checkpoint(path)
    recs = load_split(gres_root, *GSPLIT)
    probs = [p.predict(r["image_path"], r["sentence"]).no_target_prob for r in recs]
    cfg.model.no_target_threshold = model.config.no_target_threshold = float(np.median(probs))
    return save_model(path, model, cfg.to_dict())


@pytest.fixture(scope="module")
def gres_one_worker(ray_session, gres_ckpt, gres_root, tmp_path_factory) -> Path:
    from refseg.cli import main

    out = tmp_path_factory.mktemp("geval1")
    rc = main(["evaluate", "--checkpoint", str(gres_ckpt), "--data-root", str(gres_root), "--dataset", GSPLIT[0],
               "--split-by", GSPLIT[1], "--split", GSPLIT[2], "--workers", "1", "--batch-size", "8",
               "--save-masks", "--output", str(out)])
    assert rc == 0
    return out


def test_generalized_metrics_equal_recomputation(gres_one_worker, gres_root, gres_ckpt):
    """metrics.json (GRES keys) = GresMetrics over the saved masks, the records' no-target flags and
    per_sample.jsonl's predicted flags; predicted no-target masks are all-zero PNGs at the image size."""
    from refseg.data import decode_mask, load_split
    from refseg.infer import Predictor
    from refseg.metrics import GresMetrics

    metrics = json.loads((gres_one_worker / "metrics.json").read_text())
    assert {"giou", "ciou", "n_acc", "t_acc", "precision_at", "num_samples"} <= set(metrics)
    assert "oiou" not in metrics and set(metrics["precision_at"]) == {"0.7", "0.8", "0.9"}
    records = sorted(load_split(gres_root, *GSPLIT), key=lambda r: (r["ref_id"], r["sent_id"]))
    rows = [json.loads(line) for line in (gres_one_worker / "per_sample.jsonl").read_text().splitlines()]
    assert [(r["ref_id"], r["sent_id"]) for r in rows] == [(r["ref_id"], r["sent_id"]) for r in records]
    threshold = Predictor.from_checkpoint(gres_ckpt).no_target_threshold
    want = GresMetrics()
    for rec, row in zip(records, rows):
        pred = np.asarray(Image.open(gres_one_worker / "masks" / f"{rec['ref_id']}_{rec['sent_id']}.png")) > 0
        gt = decode_mask(rec)
        assert pred.shape == gt.shape == (rec["height"], rec["width"])
        assert row["gt_no_target"] == rec["no_target"]
        # GRES: no foreground pixel = a no-target prediction; the head clears the mask above its threshold
        assert row["pred_no_target"] == (row["no_target_prob"] > threshold or not pred.any())
        if row["pred_no_target"]:
            assert not pred.any()
        want.update(pred, gt, [rec["no_target"]], [row["pred_no_target"]])
    expected = want.compute()
    for key in ("giou", "ciou", "n_acc", "t_acc", "num_samples", "num_target", "num_no_target"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-12), key
    assert metrics["precision_at"] == pytest.approx(expected["precision_at"], abs=1e-12)
    inter, union, iou = want.scored()
    assert [(r["intersection"], r["union"]) for r in rows] == list(zip(inter.tolist(), union.tolist()))
    assert [r["iou"] for r in rows] == pytest.approx(iou.tolist(), abs=1e-12)
    called = [r["pred_no_target"] for r in rows]
    assert 0 < sum(called) < len(called) and 0 < expected["num_no_target"] < expected["num_samples"]


@pytest.mark.slow
def test_generalized_two_workers_give_identical_metrics(gres_one_worker, gres_ckpt, gres_root, tmp_path):
    from refseg.infer import evaluate

    m2 = evaluate(gres_ckpt, gres_root, *GSPLIT, workers=2, batch_size=8, output=tmp_path)
    m1 = json.loads((gres_one_worker / "metrics.json").read_text())
    assert _numbers(m2) == _numbers(m1)
    assert (tmp_path / "per_sample.jsonl").read_text() == (gres_one_worker / "per_sample.jsonl").read_text()


def test_predictor_no_target_prob_and_empty_mask(gres_ckpt, ckpt, gres_root):
    """Prediction.no_target_prob: None for a classic model; with the head, a sample over the threshold
    has an empty mask and an all-zero probability map at the original size, one under it does not."""
    from refseg.data import load_split
    from refseg.infer import Predictor

    recs = load_split(gres_root, *GSPLIT)[:8]
    assert Predictor.from_checkpoint(ckpt).predict(recs[0]["image_path"], recs[0]["sentence"]).no_target_prob is None
    p = Predictor.from_checkpoint(gres_ckpt)
    preds = p.predict_batch([r["image_path"] for r in recs], [r["sentence"] for r in recs])
    called = [q.no_target_prob > p.no_target_threshold for q in preds]
    assert any(called) and not all(called)
    for rec, pred, empty in zip(recs, preds, called):
        assert pred.mask.shape == pred.prob.shape == (rec["height"], rec["width"])
        assert 0.0 <= pred.no_target_prob <= 1.0
        assert pred.prob.any() != empty and (not pred.mask.any() if empty else True)


def test_gref_forms_bench_splits_the_score_by_kind_and_form(gres_ckpt, gres_root, capsys):
    """bench/gref_forms.py: every val sample counted once under its kind; its "mask empty" is the shipped
    Predictor's (the head says so or the decoder's own mask is empty); no-target IoU is 1 iff empty; the form
    table abstracts the synthetic colour and shape words."""
    import sys

    from refseg.data import load_split

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.gref_forms import form, main

    assert form("the red circles on the left", ["red", "blue"], ["circle"]) == "the C S on the left"
    got = main([str(gres_ckpt), "--data-root", str(gres_root), "--split", GSPLIT[2], "--batch", "8"])
    recs = load_split(gres_root, *GSPLIT)
    kinds = got["kinds"]
    kind_of = ["no-target" if r["no_target"] else "multi-target" if len(r["ann_ids"]) > 1 else "one-target"
               for r in recs]
    want = Counter(kind_of)
    assert {k: len(v) for k, v in kinds.items() if len(v)} == dict(want)
    # the bench's shipped call (from one pass with the head's clearing off) is the shipped Predictor's
    from refseg.infer import Predictor

    shipped = Predictor.from_checkpoint(gres_ckpt).predict_batch([r["image_path"] for r in recs],
                                                                  [r["sentence"] for r in recs])
    for kind, rows in kinds.items():
        want_empty = [not q.mask.any() for q, k in zip(shipped, kind_of) if k == kind]
        assert np.array_equal(rows[:, 1] > 0, want_empty), kind
    rows = np.concatenate(list(kinds.values()))
    head, empty, own_empty = rows[:, 0] > 0, rows[:, 1] > 0, rows[:, 2] > 0
    assert np.array_equal(empty, head | own_empty) and head.any() and not head.all()
    assert np.array_equal(kinds["no-target"][:, 3], kinds["no-target"][:, 1])
    assert sum(len(v) for v in got["forms"].values()) == len(recs) - want["no-target"]
    assert all(" C " in f or " S" in f or "shape" in f or "object" in f or "one" in f for f in got["forms"])
    assert np.array_equal(got["no_target"], [bool(r["no_target"]) for r in recs])
    assert np.allclose(got["prob"], [q.no_target_prob for q in shipped], atol=1e-6)
    out = capsys.readouterr().out
    assert "head says empty" in out and f"head: AUC {got['auc']:.4f}" in out


def test_gref_forms_head_ranking_by_hand():
    """AUC = the share of (no-target, target) pairs ranked the right way round (ties half); the best T-acc
    over thresholds keeping N-acc >= 0.85."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.gref_forms import head_ranking

    nt = np.array([True, True, False, False, False])
    assert head_ranking(np.array([0.9, 0.8, 0.3, 0.2, 0.6]), nt) == (1.0, 1.0)
    # pairs (0.9 vs 0.3, 0.2, 0.6) right, (0.5 vs 0.3, 0.2) right, (0.5 vs 0.6) wrong: 5 / 6; keeping both
    # no-target samples called (threshold < 0.5) leaves 0.6 called too: T-acc 2 / 3
    auc, best = head_ranking(np.array([0.9, 0.5, 0.3, 0.2, 0.6]), nt)
    assert auc == 5 / 6 and best == 2 / 3
    assert head_ranking(np.array([0.4, 0.4]), np.array([True, False])) == (0.5, 0.0)
    auc, best = head_ranking(np.array([0.4, 0.1]), np.array([False, False]))
    assert np.isnan(auc) and best is None

