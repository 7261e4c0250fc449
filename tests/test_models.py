"""Model tests on the tiny preset: shapes, gradients, padding invariance, learning, export, presets."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from refseg.config import config_from_dict
from refseg.config.presets import PRESETS, TINY_VOCAB_SIZE
from refseg.losses import refseg_loss
from refseg.models import build_model, load_tokenizer, preset_config
from refseg.models.export import load_model, save_model
from refseg.models.info import format_model_info, model_info
from refseg.models.text import read_vocab, tiny_vocab_path

SENTENCES = ["the red square on the left", "blue circle", "the biggest green triangle at the top", "a star"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; oversubscribed shared cores make them 5x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(preset_config("tiny").text)


def tiny_model(seed: int = 0, stem_skip: bool = True, channels: list[int] | None = None,
               **fusion) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = preset_config("tiny")
    cfg.decoder.stem_skip = stem_skip
    if channels is not None:
        cfg.decoder.channels = channels
    for k, v in fusion.items():
        setattr(cfg.fusion, k, v)
    return build_model(cfg)


def encode(tokenizer, sentences: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(sentences, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


# ----------------------------------------------------------------------------- shapes and gradients
@pytest.mark.parametrize("size", [64, 96])
@pytest.mark.parametrize("length", [8, 20])
def test_forward_backward_shapes_and_grads(tokenizer, size: int, length: int) -> None:
    model = tiny_model()
    ids, mask = encode(tokenizer, SENTENCES[:3], length)
    image = torch.randn(3, 3, size, size)
    out = model(image, ids, mask, return_attn=True)
    assert out["logits"].shape == (3, 1, size, size)
    assert out["attn"].shape == (3, size // 16, size // 16)
    attn = out["attn"].detach()
    assert float(attn.min()) >= 0.0 and float(attn.max()) == pytest.approx(1.0)
    target = (torch.rand(3, size, size) > 0.5).float()
    refseg_loss(out["logits"], target).backward()
    groups = model.param_groups(lr=1e-3, encoder_lr_mult=0.1, weight_decay=0.01)
    assert {g["name"] for g in groups} == {"encoder", "encoder_no_decay", "head", "head_no_decay"}
    for g in groups:
        assert all(p.grad is not None for p in g["params"]), f"a parameter of group {g['name']} got no gradient"
        assert any(float(p.grad.abs().sum()) > 0 for p in g["params"]), g["name"]


def test_param_groups_cover_every_trainable_param_once() -> None:
    model = tiny_model()
    groups = model.param_groups(lr=1e-3, encoder_lr_mult=0.1, weight_decay=0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    enc = {id(p) for m in (model.vision.body, model.text.bert) for p in m.parameters()}
    for g in groups:
        assert g["lr"] == pytest.approx(1e-4 if g["name"].startswith("encoder") else 1e-3)
        assert all((id(p) in enc) == g["name"].startswith("encoder") for p in g["params"])
        if g["name"].endswith("no_decay"):
            assert g["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in g["params"])
        else:
            assert g["weight_decay"] == 0.05 and all(p.ndim > 1 for p in g["params"])
    torch.optim.AdamW(groups)  # accepted as-is

    cfg = preset_config("tiny")
    cfg.text.freeze_encoder = True
    frozen = build_model(cfg)
    n = sum(len(g["params"]) for g in frozen.param_groups(1e-3, 0.1, 0.0))
    assert n == sum(1 for p in frozen.parameters() if p.requires_grad) < len(list(frozen.parameters()))


def test_any_input_size_and_attention_paths_agree(tokenizer) -> None:
    model = tiny_model().eval()
    ids, mask = encode(tokenizer, SENTENCES[:2], 12)
    image = torch.randn(2, 3, 70, 90)  # not a multiple of 32: padded internally
    with torch.no_grad():
        fast = model(image, ids, mask)["logits"]
        slow = model(image, ids, mask, return_attn=True)
    assert fast.shape == (2, 1, 70, 90)
    assert slow["attn"].shape == (2, 5, 6)
    torch.testing.assert_close(fast, slow["logits"], atol=1e-5, rtol=1e-4)  # SDPA == explicit softmax


def test_bf16_autocast_forward_backward(tokenizer) -> None:
    model = tiny_model()
    ids, mask = encode(tokenizer, SENTENCES[:2], 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64), ids, mask, return_attn=True)
        loss = refseg_loss(out["logits"], torch.ones(2, 64, 64))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("level", [8, 32])
def test_other_fusion_levels_reach_input_size(tokenizer, level: int) -> None:
    # at level 32 the 4 decoder stages sit at strides 16, 8, 4, 2: no stage before the last at stride 2;
    # at level 8 three stages (strides 4, 2, 1) reach the input, a fourth would end at stride 0.5
    channels = [16, 16, 8] if level == 8 else None
    model = tiny_model(level=level, stem_skip=level != 32, channels=channels)
    ids, mask = encode(tokenizer, SENTENCES[:2], 8)
    out = model(torch.randn(2, 3, 64, 64), ids, mask)["logits"]
    assert out.shape == (2, 1, 64, 64) and model.decoder.strides[-1] == (1.0 if level == 8 else 2.0)
    with pytest.raises(ValueError, match=r"stem_skip needs a decoder stage at stride 2.*\[16, 8, 4, 2\]"):
        tiny_model(level=32, stem_skip=True)
    with pytest.raises(ValueError, match=r"fusion.level=8 the 4 decoder.channels end at stride 0.5 .*\[16, 16, 8\]"):
        tiny_model(level=8)


def test_stem_skip_starts_as_identity_then_learns(tokenizer) -> None:
    from refseg.models.vision import VisionEncoder

    ids, mask = encode(tokenizer, SENTENCES[:2], 8)
    image = torch.randn(2, 3, 64, 64)
    skip, plain = tiny_model(stem_skip=True), tiny_model(stem_skip=False)
    assert skip.decoder.uses_stem and not plain.decoder.uses_stem
    feats = skip.vision(image, skip.text(ids, mask)[1], stem=True)
    assert feats["2"].shape == (2, skip.vision.stem_channels, 32, 32) and "2" not in plain.vision(image, feats["2"].new_zeros(2, 64))
    missing, unexpected = plain.load_state_dict(skip.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("decoder.skips.2.") for k in unexpected)
    with torch.no_grad():  # zero at init: the same logits as the decoder without the skip (eval: no dropout)
        torch.testing.assert_close(skip.eval()(image, ids, mask)["logits"], plain.eval()(image, ids, mask)["logits"])
    skip.train()
    target = (torch.rand(2, 64, 64) > 0.7).float()
    refseg_loss(skip(image, ids, mask)["logits"], target).backward()
    assert skip.decoder.skips["2"].proj[1].weight.grad.abs().sum() > 0  # the skip's scale gets a gradient
    # a torchvision body exposes conv1's 64 stride-2 maps
    r18 = VisionEncoder("resnet18", weights=None, pretrained=False, fpn_channels=16)
    assert r18.stem_channels == 64 and r18(torch.randn(1, 3, 64, 64), stem=True)["2"].shape == (1, 64, 32, 32)


# ----------------------------------------------------------------------------- padding invariance
def test_text_encoder_padding_invariance(tokenizer) -> None:
    text = tiny_model().text.eval()
    ids, mask = encode(tokenizer, SENTENCES, 12)
    ids_long, mask_long = encode(tokenizer, SENTENCES, 20)
    assert torch.equal(ids_long[:, :12], ids) and int(mask_long[:, 12:].sum()) == 0
    with torch.no_grad():
        w, s = text(ids, mask)
        w2, s2 = text(ids_long, mask_long)
    torch.testing.assert_close(w2[:, :12], w, atol=1e-5, rtol=0)
    torch.testing.assert_close(s2, s, atol=1e-5, rtol=0)
    assert float(w2[:, 12:].abs().max()) == 0.0
    assert float((w * (1 - mask[..., None])).abs().max()) == 0.0  # zeros at padding


def test_full_model_padding_invariance(tokenizer) -> None:
    model = tiny_model().eval()
    image = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        a = model(image, *encode(tokenizer, SENTENCES, 12), return_attn=True)
        b = model(image, *encode(tokenizer, SENTENCES, 24), return_attn=True)
    torch.testing.assert_close(b["logits"], a["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(b["attn"], a["attn"], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- learning
def _shapes_batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two images (red square + blue disk, positions swapped), each paired with both phrases."""
    S = 64
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    images, masks = [], []
    for sq_x, disk_x in ((16, 46), (46, 16)):
        square = ((xx - sq_x).abs() <= 8) & ((yy - 24).abs() <= 8)
        disk = ((xx - disk_x) ** 2 + (yy - 40) ** 2) <= 81
        img = torch.full((3, S, S), -1.0)
        img[0][square] = 1.0  # red
        img[2][disk] = 1.0  # blue
        images += [img, img]
        masks += [square, disk]
    ids, mask = encode(tokenizer, ["the red square", "blue circle"] * 2, 8)
    return torch.stack(images), ids, mask, torch.stack(masks).float()


def test_overfits_one_batch(tokenizer) -> None:
    torch.manual_seed(0)
    model = tiny_model()
    image, ids, mask, target = _shapes_batch(tokenizer)
    opt = torch.optim.AdamW(model.param_groups(lr=3e-3, encoder_lr_mult=1.0, weight_decay=0.0))
    losses = []
    for _ in range(250):  # ~15 s on one free core
        loss = refseg_loss(model(image, ids, mask)["logits"], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        pred = model(image, ids, mask)["logits"][:, 0] > 0
    iou = float((pred & target.bool()).sum() / (pred | target.bool()).sum())
    assert losses[-1] < 0.3 * losses[0], losses[::15]
    assert iou > 0.9, iou  # same image, different phrase -> different mask: language is used


def test_early_fusion_makes_visual_features_depend_on_the_sentence(tokenizer) -> None:
    from refseg.models.vision import VisionEncoder

    torch.manual_seed(0)
    image = torch.randn(1, 3, 64, 64).expand(2, -1, -1, -1)  # one image, two phrases
    ids, mask = encode(tokenizer, ["the red square", "the leftmost blue circle"], 8)
    model = tiny_model().eval()
    assert model.vision.film is not None  # the tiny preset is language-aware
    with torch.no_grad():
        _, sentence = model.text(ids, mask)
        feats = model.vision(image, sentence)
    assert not torch.allclose(feats["4"][0], feats["4"][1])  # same pixels, different phrase
    with pytest.raises(ValueError, match="fusion.early=true"):
        model.vision(image)
    # over a pretrained body the modulation starts as the identity: pretrained features stay intact
    kw = {"widths": [8, 8, 8, 8], "fpn_channels": 16, "language_dim": sentence.shape[1]}
    torch.manual_seed(1)
    aware = VisionEncoder("tiny", weights="body.pt", pretrained=False, **kw).eval()
    plain = VisionEncoder("tiny", weights=None, pretrained=False, **{**kw, "language_dim": None}).eval()
    plain.load_state_dict({k: v for k, v in aware.state_dict().items() if not k.startswith("film.")})
    with torch.no_grad():
        for stride, f in aware(image, sentence).items():
            torch.testing.assert_close(f, plain(image)[stride])


# ----------------------------------------------------------------------------- presets and info
def test_presets_and_errors() -> None:
    assert set(PRESETS) == {"r101", "r50", "tiny"}
    cfg = preset_config("tiny")
    assert cfg.preset == "tiny" and cfg.text.bert_config["vocab_size"] == TINY_VOCAB_SIZE
    assert len(read_vocab(tiny_vocab_path())) == TINY_VOCAB_SIZE  # the bundled file and the preset agree
    assert config_from_dict({"model": {"preset": "tiny", "dim": 32}}).model.vision.backbone == "tiny"
    with pytest.raises(ValueError, match="r101, r50, tiny"):
        preset_config("r18")


def test_tiny_tokenizer_matches_vocab(tokenizer) -> None:
    assert len(tokenizer) == TINY_VOCAB_SIZE == preset_config("tiny").text.bert_config["vocab_size"]
    assert tokenizer.pad_token_id == 0
    words = "the red green blue yellow purple orange white black gray grey pink brown cyan circle square " \
            "triangle rectangle star leftmost rightmost top bottom middle center upper lower biggest smallest"
    ids = tokenizer(words)["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(ids) == len(words.split()) + 2


@pytest.mark.parametrize("name, total", [("r101", 161_655_492), ("r50", 87_281_860)])
def test_large_preset_parameter_counts(name: str, total: int) -> None:
    """The presets' exact sizes (random init of the same shapes, offline): any change to the
    architecture changes these numbers."""
    info = model_info(name)  # pretrained=False: offline
    assert info["total"] == total, format_model_info(info)
    parts = ("vision_body", "fpn", "text_encoder", "lstm", "fusion", "decoder")
    assert sum(info[k] for k in parts) == info["total"]
    assert "total" in format_model_info(info)


def test_tiny_is_small() -> None:
    info = model_info("tiny")
    assert info["total"] == 701_572
    assert info["total"] == sum(p.numel() for p in build_model("tiny").parameters())


# ----------------------------------------------------------------------------- weights and export
def test_bad_vision_weights_are_clear_errors(tmp_path) -> None:
    cfg = preset_config("tiny")
    cfg.vision.backbone, cfg.vision.weights = "resnet18", "IMAGENET_BOGUS"
    with pytest.raises(ValueError, match=r"vision.weights='IMAGENET_BOGUS' .*IMAGENET1K_V1"):
        build_model(cfg, pretrained=False)
    cfg = preset_config("tiny")
    cfg.vision.weights = "IMAGENET1K_V1"
    with pytest.raises(ValueError, match="not usable with backbone 'tiny'"):
        build_model(cfg)
    cfg.vision.weights = str(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="does not exist"):
        build_model(cfg)
    cfg.vision.norm = "layernorm"
    with pytest.raises(ValueError, match="vision.norm"):
        build_model(cfg, pretrained=False)


def test_vision_weights_from_local_state_dict(tmp_path) -> None:
    src = tiny_model(seed=1).vision.body
    path = tmp_path / "body.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    cfg = preset_config("tiny")
    cfg.vision.weights = str(path)
    torch.manual_seed(2)
    body = build_model(cfg).vision.body
    for k, v in src.state_dict().items():
        assert torch.equal(body.state_dict()[k], v), k


@pytest.mark.parametrize("norm", ["frozen_bn", "gn", "bn"])
def test_torchvision_backbone_loads_a_classifier_state_dict(tmp_path, norm: str) -> None:
    import torchvision

    from refseg.models.vision import VisionEncoder

    src = torchvision.models.resnet18(weights=None).state_dict()  # includes fc.* and BN statistics
    path = tmp_path / "resnet18.pth"
    torch.save(src, path)
    enc = VisionEncoder("resnet18", str(path), pretrained=True, norm=norm, fpn_channels=32)
    assert torch.equal(enc.body.layer3[0].conv1.weight, src["layer3.0.conv1.weight"])
    assert torch.equal(enc.body.bn1.weight, src["bn1.weight"])
    feats = enc(torch.randn(1, 3, 64, 64))
    assert {s: tuple(f.shape) for s, f in feats.items()} == {"4": (1, 32, 16, 16), "8": (1, 32, 8, 8),
                                                              "16": (1, 32, 4, 4), "32": (1, 32, 2, 2)}
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(ValueError, match="could not be read"):
        VisionEncoder("resnet18", str(tmp_path / "junk.pth"), pretrained=True)


def test_save_load_round_trip(tmp_path, tokenizer) -> None:
    model = tiny_model().eval()
    ids, mask = encode(tokenizer, SENTENCES[:2], 10)
    image = torch.randn(2, 3, 64, 64)
    path = save_model(tmp_path / "out" / "model.pt", model, {"train": {"lr": 1e-3}})
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no temp file left
    loaded, config = load_model(path)
    assert config == {"train": {"lr": 1e-3}}
    assert loaded.config == model.config and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, ids, mask)["logits"], model(image, ids, mask)["logits"],
                                   atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        load_model(tmp_path / "bad.pt")
    # a file whose weights no longer fit the layout its config builds (an older refseg's model.pt): one sentence
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["vision.body.stem.0.weight"] = torch.zeros(8, 3, 3, 3)
    payload.pop("refseg_version")
    torch.save(payload, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"model file '.*old.pt' \(written by an older refseg\) does not match the "
                                         r"model this refseg builds from its config \(size mismatch for "
                                         r"vision.body.stem.0.weight.*\); load it with the refseg version"):
        load_model(tmp_path / "old.pt")


def test_no_target_head_only_with_the_flag(tmp_path, tokenizer) -> None:
    """model.no_target_head adds the head's parameters and a (B,) logit and changes nothing else: same
    initial weights and mask logits as the classic model, whose keys and outputs have no trace of it."""
    from refseg.losses import generalized_loss

    classic = tiny_model().eval()
    cfg = preset_config("tiny")
    cfg.no_target_head = True
    torch.manual_seed(0)
    headed = build_model(cfg).eval()
    plain, extra = classic.state_dict(), headed.state_dict()
    assert not any("no_target" in k for k in plain)
    assert sorted(set(extra) - set(plain)) == sorted(k for k in extra if k.startswith("no_target."))
    assert all(torch.equal(plain[k], extra[k]) for k in plain)
    ids, mask = encode(tokenizer, SENTENCES[:3], 10)
    image = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        a, b = classic(image, ids, mask), headed(image, ids, mask)
    assert set(a) == {"logits"} and set(b) == {"logits", "no_target_logit"}
    assert torch.equal(a["logits"], b["logits"]) and b["no_target_logit"].shape == (3,)
    headed.train()
    out = headed(image, ids, mask)
    generalized_loss(out["logits"], torch.zeros(3, 64, 64), out["no_target_logit"], torch.tensor([1.0, 0, 1])).backward()
    head_params = {id(p) for p in headed.no_target.parameters()}
    groups = headed.param_groups(lr=1e-3)
    assert {id(p) for g in groups if g["name"].startswith("head") for p in g["params"]} >= head_params
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in headed.no_target.parameters())
    loaded, _ = load_model(save_model(tmp_path / "model.pt", headed.eval(), {}))
    assert loaded.config.no_target_head
    with torch.no_grad():
        assert torch.equal(loaded(image, ids, mask)["no_target_logit"], headed(image, ids, mask)["no_target_logit"])


@pytest.mark.parametrize("region", [False, True])
def test_no_target_head_is_a_detached_probe(tokenizer, region: bool) -> None:
    """With model.no_target_detach the head's BCE trains the head's weights and nothing else: it reads the
    fused tokens, the sentence feature and the mask logits (and, with model.no_target_region, the vision
    maps) detached. The mask loss still trains decoder and encoders, and the head's logit still moves with
    what it reads. Without it (the default) the head's loss reaches the decoder and the encoders too."""
    cfg = preset_config("tiny")
    cfg.no_target_head = True
    cfg.no_target_region = region
    torch.manual_seed(0)
    coupled = build_model(cfg).train()
    cfg.no_target_detach = True
    torch.manual_seed(0)
    model = build_model(cfg).train()
    ids, mask = encode(tokenizer, SENTENCES[:2], 10)
    image = torch.randn(2, 3, 64, 64)

    def reached(module: torch.nn.Module) -> bool:
        return any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in module.parameters())

    def head_loss(m: torch.nn.Module) -> torch.Tensor:
        logit = m(image, ids, mask)["no_target_logit"]
        return torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.tensor([1.0, 0.0]))

    head_loss(coupled).backward()
    assert all(reached(m) for m in (coupled.no_target, coupled.vision, coupled.fusion, coupled.decoder))
    head_loss(model).backward()
    assert reached(model.no_target)
    assert not any(reached(m) for m in (model.vision, model.text, model.fusion, model.decoder))
    model.zero_grad(set_to_none=True)
    refseg_loss(model(image, ids, mask)["logits"], torch.zeros(2, 64, 64)).backward()
    assert all(reached(m) for m in (model.vision, model.text, model.fusion, model.decoder))
    # what it reads still decides: a bright blob in the mask or other fused tokens change the logit
    with torch.no_grad():
        fused, sentence = torch.randn(2, 64, 4, 4), torch.randn(2, 64)
        dark, bright = torch.full((2, 1, 16, 16), -8.0), torch.full((2, 1, 16, 16), -8.0)
        bright[:, :, 4:8, 4:8] = 8.0
        maps = (torch.randn(2, 64, 4, 4),) if region else ()  # the stride-4 + stride-8 maps (2 x fpn 32)
        base = model.no_target(fused, sentence, dark, *maps)
        assert not torch.allclose(base, model.no_target(fused, sentence, bright, *maps))
        assert not torch.allclose(base, model.no_target(fused + 1.0, sentence, dark, *maps))
        if region:
            lit = model.no_target(fused, sentence, bright, *maps)
            # other maps under the mask (channels reordered: the head normalizes each pooled vector, so a
            # uniform shift would not count as different)
            assert not torch.allclose(lit, model.no_target(fused, sentence, bright, maps[0].flip(1)))


def test_no_target_head_reads_the_mask_evidence() -> None:
    """The head sees the decoder's logits: with fused tokens and sentence features that say nothing about
    the label (the same for both classes), it still learns to call a sample empty from an empty-looking
    mask (all logits low) and a target from one bright blob; without that input it could not beat 0.5."""
    from refseg.models.heads import NoTargetHead

    torch.manual_seed(0)
    head = NoTargetHead(8)
    fused, sentence = torch.randn(1, 8, 3, 3).expand(16, -1, -1, -1), torch.randn(1, 8).expand(16, -1)
    label = torch.tensor([0.0, 1.0] * 8)
    logits = torch.full((16, 1, 12, 12), -6.0) + 0.5 * torch.randn(16, 1, 12, 12)
    for i in range(0, 16, 2):  # target samples: one blob of positive logits somewhere
        r, c = divmod(i * 5, 9)
        logits[i, 0, r:r + 3, c:c + 3] = 5.0
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(fused, sentence, logits), label)
        loss.backward()
        opt.step()
    with torch.no_grad():
        called = torch.sigmoid(head(fused, sentence, logits)) > 0.5
        assert called.tolist() == [bool(v) for v in label.tolist()]
        assert float(loss) < 0.05
        # the evidence, not the sample's position in the batch: swap two samples' masks, their calls swap
        swapped = logits.clone()
        swapped[[0, 1]] = logits[[1, 0]]
        assert (torch.sigmoid(head(fused, sentence, swapped)) > 0.5)[:2].tolist() == [True, False]


def test_no_target_head_checks_what_lies_under_the_mask() -> None:
    """With model.no_target_region the head reads the fine vision maps where the mask is: two classes with
    the same fused tokens, sentence and mask logits (one blob at the same place), told apart only by the
    features under the blob, are learned (a distractor with the opposite pattern lies outside the mask);
    swapping two samples' features under the blob swaps their calls."""
    from refseg.models.heads import NoTargetHead

    torch.manual_seed(0)
    head = NoTargetHead(8, region_channels=4)
    n = 16
    fused, sentence = torch.randn(1, 8, 3, 3).expand(n, -1, -1, -1), torch.randn(1, 8).expand(n, -1)
    label = torch.tensor([0.0, 1.0] * (n // 2))
    logits = torch.full((n, 1, 24, 24), -6.0)
    logits[:, :, 4:12, 4:12] = 6.0  # the predicted object: region cells 1..2 of the 6 x 6 map
    region = 0.1 * torch.randn(n, 4, 6, 6)
    under = torch.where(label.bool(), -1.0, 1.0)[:, None]  # what the object looks like: class-dependent
    region[:, 0, 1:3, 1:3] += under[..., None]
    region[:, 1, 4:6, 4:6] -= under[..., None]  # the opposite pattern elsewhere (not under the mask)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(fused, sentence, logits, region), label)
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert (torch.sigmoid(head(fused, sentence, logits, region)) > 0.5).tolist() == label.bool().tolist()
        assert float(loss) < 0.05
        # the calls follow the features under the mask, not the sample's position in the batch
        moved = region.clone()
        moved[[0, 1], 0, 1:3, 1:3] = region[[1, 0], 0, 1:3, 1:3]
        assert (torch.sigmoid(head(fused, sentence, logits, moved)) > 0.5)[:2].tolist() == [True, False]


def test_public_api_resolves() -> None:
    from refseg import models

    for name in models.__all__:
        assert getattr(models, name) is not None
    with pytest.raises(AttributeError):
        models.no_such_name  # noqa: B018


def test_models_package_imports_no_ray_and_presets_no_torch() -> None:
    code = (
        "import sys\n"
        "from refseg.config import config_from_dict\n"
        "config_from_dict({'model': {'preset': 'tiny'}})\n"
        "assert 'torch' not in sys.modules, 'presets pulled in torch'\n"
        "import refseg.models.refseg_model, refseg.models.export, refseg.models.info, refseg.losses\n"
        "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules), 'ray imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
