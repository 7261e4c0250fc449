"""Predictor: checkpoint forms, predictions at the original size whatever the input type, visualisation.

``tiny_checkpoint(tmp_path_factory)`` (also used by the other inference tests) builds the tiny model with
a fixed seed and saves model.pt (64 px config) once a session.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

IMAGE_SIZE = 64
_CACHE: dict[str, Path] = {}


def make_tiny_checkpoint(path: Path, keep_aspect: bool = False) -> Path:
    """The tiny model with a fixed seed and its logit head's bias at 0 instead of the foreground prior
    (so the random-init masks cover ~30% of an image, neither empty nor full) -> save_model(path)."""
    import torch

    from refseg.config import config_from_dict
    from refseg.models import build_model
    from refseg.models.export import save_model

    cfg = config_from_dict({"model": {"preset": "tiny"},
                            "data": {"image_size": IMAGE_SIZE, "keep_aspect": keep_aspect}})
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False).eval()
    torch.nn.init.zeros_(model.decoder.head[0].bias)
    return save_model(path, model, cfg.to_dict())


def tiny_checkpoint(tmp_path_factory, keep_aspect: bool = False) -> Path:
    """The session's tiny model.pt (made once per variant)."""
    key = f"keep_aspect={keep_aspect}"
    if key not in _CACHE:
        path = tmp_path_factory.mktemp("ckpt") / "model.pt"
        _CACHE[key] = make_tiny_checkpoint(path, keep_aspect=keep_aspect)
    return _CACHE[key]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def predictor(ckpt):
    from refseg.infer import Predictor

    return Predictor.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def sample(synthetic_root):
    from refseg.data import load_split

    return load_split(synthetic_root, "refcoco", "unc", "val")[0]


def test_path_pil_and_array_give_the_same_mask_at_original_size(predictor, sample):
    path = sample["image_path"]
    h, w = Image.open(path).size[::-1]
    by_path = predictor.predict(path, sample["sentence"])
    by_pil = predictor.predict(Image.open(path), sample["sentence"])
    by_array = predictor.predict(np.asarray(Image.open(path).convert("RGB")), sample["sentence"])
    assert by_path.mask.shape == (h, w) and by_path.mask.dtype == bool
    assert by_path.prob.shape == (h, w) and by_path.prob.dtype == np.float32
    assert 0 < by_path.mask.sum() < h * w
    for other in (by_pil, by_array):
        np.testing.assert_array_equal(other.mask, by_path.mask)
        np.testing.assert_allclose(other.prob, by_path.prob, atol=1e-6)
    np.testing.assert_array_equal(by_path.mask, by_path.prob > 0.5)
    assert by_path.attn.ndim == 2 and 0.0 <= by_path.attn.min() and by_path.attn.max() <= 1.0
    strict = predictor.predict(path, sample["sentence"], threshold=0.9)
    assert strict.mask.sum() <= by_path.mask.sum()


def test_prediction_equals_manual_pipeline(predictor, sample):
    """prob = bilinear warp of sigmoid(logits) from S x S back to H x W (unresize_logits)."""
    import torch

    from refseg.data import load_image, preprocess_with_meta, tokenize, unresize_logits
    from refseg.data.transforms import normalize_images

    image = load_image(sample["image_path"])
    x, _, meta = preprocess_with_meta(image, None, IMAGE_SIZE, False)
    assert x.dtype == np.uint8 and predictor.prepare(image)[0].dtype == np.uint8
    ids, am = tokenize(predictor.tokenizer, [sample["sentence"]], predictor.max_tokens)
    x = normalize_images(torch.from_numpy(x[None]))
    with torch.inference_mode():
        logits = predictor.model(x, torch.from_numpy(ids), torch.from_numpy(am))["logits"]
    want = unresize_logits(torch.sigmoid(logits)[0, 0].numpy(), meta)
    got = predictor.predict(image, sample["sentence"]).prob
    np.testing.assert_allclose(got, want, atol=1e-5)
    # forward also takes images normalised already (float32), to the same probabilities
    np.testing.assert_array_equal(predictor.forward(x.numpy(), [sample["sentence"]])[0],
                                  predictor.forward(predictor.prepare(image)[0][None], [sample["sentence"]])[0])


def test_predict_batch_matches_single_predictions(predictor, synthetic_root):
    from refseg.data import load_split

    recs = load_split(synthetic_root, "refcoco", "unc", "val")[:3]
    batch = predictor.predict_batch([r["image_path"] for r in recs], [r["sentence"] for r in recs])
    for r, b in zip(recs, batch):
        single = predictor.predict(r["image_path"], r["sentence"])
        assert b.mask.shape == (r["height"], r["width"])
        np.testing.assert_allclose(b.prob, single.prob, atol=1e-5)
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        predictor.predict_batch([recs[0]["image_path"]] * 2, ["x"])


def test_awkward_images_are_segmented_at_their_size(predictor, tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)
    cases = {"L": Image.fromarray(rgb[..., 0]), "RGBA": Image.fromarray(rgb).convert("RGBA"),
             "CMYK": Image.fromarray(rgb).convert("CMYK"), "P": Image.fromarray(rgb).convert("P"),
             "I;16": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).convert("I;16"),
             "1x1": Image.fromarray(rgb[:1, :1])}
    for name, img in cases.items():
        pred = predictor.predict(img, "the red circle")
        assert pred.mask.shape == (img.height, img.width), name
    assert predictor.predict(rgb[..., 0], "grey array").mask.shape == (37, 53)
    assert predictor.predict(np.dstack([rgb, rgb[..., :1]]), "rgba array").mask.shape == (37, 53)


def test_keep_aspect_checkpoint_predicts_at_original_size(tmp_path_factory, sample):
    from refseg.infer import Predictor

    p = Predictor.from_checkpoint(tiny_checkpoint(tmp_path_factory, keep_aspect=True))
    assert p.keep_aspect
    pred = p.predict(sample["image_path"], sample["sentence"])
    assert pred.mask.shape == (sample["height"], sample["width"])
    level = p.model.level  # the heat map covers the image content only (no padding cells)
    long_side = max(sample["height"], sample["width"])
    assert pred.attn.shape == tuple(-(-round(s * IMAGE_SIZE / long_side) // level)
                                    for s in (sample["height"], sample["width"]))


def test_checkpoint_forms_and_config(ckpt, tmp_path, sample):
    import torch
    import yaml

    from refseg.config import ConfigError, config_from_dict
    from refseg.infer import load_checkpoint_model

    model, cfg = load_checkpoint_model(ckpt, "cpu")
    assert cfg.data.image_size == IMAGE_SIZE and cfg.model.preset == "tiny" and not model.training
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(ckpt, run_dir / "model.pt")
    from_dir, _ = load_checkpoint_model(run_dir, "cpu")

    # a ZeRO-0 DeepSpeed checkpoint dir (config.yaml + ckpt/mp_rank_00_model_states.pt) is consolidated
    ds = tmp_path / "ds"
    (ds / "ckpt").mkdir(parents=True)
    full = config_from_dict({"model": {"preset": "tiny"}, "data": {"image_size": IMAGE_SIZE},
                             "deepspeed": {"zero_stage": 0}})
    (ds / "config.yaml").write_text(yaml.safe_dump(full.to_dict(), sort_keys=False))
    torch.save({"module": model.state_dict()}, ds / "ckpt" / "mp_rank_00_model_states.pt")
    from_ds, cfg_ds = load_checkpoint_model(ds, "cpu")
    assert cfg_ds.deepspeed.zero_stage == 0
    for other in (from_dir, from_ds):
        for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), k

    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint_model(tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match="neither a model.pt"):
        load_checkpoint_model(tmp_path / "ds" / "ckpt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="could not be read"):
        load_checkpoint_model(tmp_path / "junk.pt")


def test_visualize_writes_overlay_and_heat_map(predictor, sample, tmp_path):
    out = predictor.visualize(sample["image_path"], sample["sentence"], tmp_path / "vis" / "v.png")
    img = Image.open(out)
    h, w = sample["height"], sample["width"]
    assert img.mode == "RGB" and img.height > h and img.width >= 2 * w  # two panels + a caption row
    assert not list((tmp_path / "vis").glob("*.tmp"))


@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_cuda_bf16_matches_cpu(ckpt, sample):
    from refseg.infer import Predictor

    cpu = Predictor.from_checkpoint(ckpt).predict(sample["image_path"], sample["sentence"])
    gpu = Predictor.from_checkpoint(ckpt, "cuda").predict(sample["image_path"], sample["sentence"])
    assert np.abs(gpu.prob - cpu.prob).max() < 0.05
    assert (gpu.mask != cpu.mask).mean() < 0.02


@pytest.mark.slow
def test_compiled_predictor_matches_eager(ckpt, sample):
    """``compile=True`` (refseg evaluate/segment --compile) runs torch.compile's graph: same probabilities."""
    from refseg.infer import Predictor

    eager = Predictor.from_checkpoint(ckpt)
    compiled = Predictor.from_checkpoint(ckpt, compile=True)
    assert compiled._run is not compiled.model  # the compiled wrapper, not the module itself
    want = eager.predict(sample["image_path"], sample["sentence"])
    got = compiled.predict(sample["image_path"], sample["sentence"])
    np.testing.assert_allclose(got.prob, want.prob, atol=1e-4)
    assert (got.mask != want.mask).mean() < 1e-3
