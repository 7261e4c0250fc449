"""`refseg export-onnx`: the ONNX graph matches PyTorch (probabilities within 1e-3) with a dynamic batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_predictor import IMAGE_SIZE, tiny_checkpoint

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    from refseg.cli import main

    ckpt = tiny_checkpoint(tmp_path_factory)
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export-onnx", "--checkpoint", str(ckpt), "--out", str(out), "--opset", "17"]) == 0
    return ckpt, out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


@pytest.mark.parametrize("batch", [2, 1, 3])
def test_onnx_matches_pytorch(exported, synthetic_root, batch):
    import torch

    from refseg.data import load_image, load_split, preprocess, tokenize
    from refseg.data.transforms import normalize_images
    from refseg.infer import Predictor

    ckpt, path = exported
    p = Predictor.from_checkpoint(ckpt)
    recs = load_split(synthetic_root, "refcoco", "unc", "val")[:batch]
    texts = [r["sentence"] for r in recs]
    texts[0] = "the " + " ".join(["big"] * 40) + " red circle"  # truncated to max_tokens: a full row
    pixels = np.stack([preprocess(load_image(r["image_path"]), None, IMAGE_SIZE, False)[0] for r in recs])
    image = normalize_images(torch.from_numpy(pixels)).numpy()  # the graph takes normalised float32 images
    ids, am = tokenize(p.tokenizer, texts, p.max_tokens)
    assert am[0].sum() == p.max_tokens and all(am[1:].sum(1) < p.max_tokens)  # full and padded rows
    with torch.inference_mode():
        want = p.model(torch.from_numpy(image), torch.from_numpy(ids), torch.from_numpy(am))["logits"].numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image", "input_ids", "attention_mask"]
    (got,) = sess.run(["logits"], {"image": image, "input_ids": ids, "attention_mask": am})
    assert got.shape == want.shape == (batch, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert np.abs(_sigmoid(got) - _sigmoid(want)).max() < 1e-3


def test_onnx_metadata_and_dynamic_batch_axis(exported):
    import onnx

    _, path = exported
    meta = json.loads(Path(f"{path}.json").read_text())
    assert meta["image_size"] == IMAGE_SIZE and meta["max_tokens"] == 20 and meta["opset"] == 17
    assert meta["verified_max_abs_diff"] < 1e-3
    graph = onnx.load(str(path)).graph
    for value in list(graph.input) + list(graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name


def test_bad_opset_is_a_usage_error(exported, tmp_path):
    from refseg.cli import main

    ckpt, _ = exported
    assert main(["export-onnx", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--opset", "5"]) == 2


@pytest.mark.parametrize("region", [False, True])
def test_no_target_head_is_a_second_output(tmp_path, region):
    """A gRefCOCO model's graph also returns the no-target logit, equal to PyTorch's (with the head reading
    the vision maps under the mask too: model.no_target_region); its threshold is in the metadata (a
    runtime that dropped it would segment "the purple star" where there is none)."""
    import torch

    from refseg.cli import main
    from refseg.config import config_from_dict
    from refseg.infer import Predictor
    from refseg.infer.export import INPUTS, sample_inputs
    from refseg.models import build_model
    from refseg.models.export import save_model

    cfg = config_from_dict({"model": {"preset": "tiny", "no_target_head": True, "no_target_threshold": 0.3,
                                      "no_target_region": region},
                            "data": {"image_size": IMAGE_SIZE}})
    torch.manual_seed(1)
    model = build_model(cfg.model, pretrained=False).eval()
    model.no_target.mlp[2].weight.data *= 50  # spread the probabilities: a wrong output would show
    ckpt = save_model(tmp_path / "model.pt", model, cfg.to_dict())
    out = tmp_path / "gres.onnx"
    assert main(["export-onnx", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["outputs"]["no_target_logit"] == ["batch"] and meta["no_target_threshold"] == 0.3
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "no_target_logit"]
    feed = sample_inputs(Predictor.from_checkpoint(ckpt), 3, seed=5)
    logits, no_target = sess.run(["logits", "no_target_logit"], feed)
    with torch.inference_mode():
        want = model(*(torch.from_numpy(feed[k]) for k in INPUTS))
    assert no_target.shape == (3,) and logits.shape == (3, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert np.abs(no_target - want["no_target_logit"].numpy()).max() < 1e-3
    assert np.ptp(no_target) > 0.5  # the samples' logits differ: the check above compares real values
