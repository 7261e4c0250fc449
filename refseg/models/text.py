"""The text side: tokenizers (the bundled tiny vocab, WordPiece files, Hugging Face) and the language
encoder, a BERT-family transformer followed by a packed BiLSTM.

    tok = load_tokenizer(cfg.model.text)   # "builtin:tiny_vocab", a vocab .txt, or a hub name / local dir
    enc = TextEncoder(build_bert("bert-base-uncased", None, pretrained=True), lstm_hidden=128, dim=256)
    words, sentence = enc(input_ids, attention_mask)   # (B, L, 256) zero at padding, (B, 256)

Padding must be on the right (what BERT tokenizers do); appending PAD tokens leaves the word
features of real tokens and the sentence feature unchanged.
"""

from __future__ import annotations

import os
import re
import socket
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from refseg.config import TINY_TOKENIZER, TextConfig

_MINIATURE = re.compile(r"bert_uncased_L-(\d+)_H-(\d+)_A-(\d+)$")  # google/bert_uncased_L-*_H-*_A-*


def tiny_vocab_path() -> Path:
    """Path of the bundled WordPiece vocabulary (one token per line; [PAD]=0), selected by TINY_TOKENIZER."""
    return Path(str(resources.files("refseg.models") / "assets" / "tiny_vocab.txt"))


def read_vocab(path: str | Path) -> dict[str, int]:
    """WordPiece vocab file -> {token: id} (id = line number)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return {tok: i for i, tok in enumerate(lines) if tok}


def _tokenizer_from_vocab(path: Path, max_length: int = 128) -> Any:
    import inspect

    from transformers import BertTokenizerFast

    params = inspect.signature(BertTokenizerFast.__init__).parameters
    if "vocab_file" in params:  # transformers 4.x
        return BertTokenizerFast(vocab_file=str(path), do_lower_case=True, model_max_length=max_length)
    return BertTokenizerFast(vocab=read_vocab(path), do_lower_case=True, model_max_length=max_length)


def load_tokenizer(text_cfg: TextConfig | str) -> Any:
    """Tokenizer for ``text_cfg`` (source = ``text.tokenizer`` or ``text.encoder``).

    ``"builtin:tiny_vocab"`` -> the bundled tiny vocab; a ``.txt`` file -> a WordPiece vocab file;
    anything else -> ``AutoTokenizer.from_pretrained`` (hub name or local directory).
    """
    source = text_cfg if isinstance(text_cfg, str) else (text_cfg.tokenizer or text_cfg.encoder)
    if source == TINY_TOKENIZER:
        return _tokenizer_from_vocab(tiny_vocab_path())
    if source.endswith(".txt"):
        if not Path(source).is_file():
            raise ValueError(f"tokenizer vocab file '{source}' does not exist; pass an existing WordPiece vocab.")
        return _tokenizer_from_vocab(Path(source))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise ValueError(
            f"could not load tokenizer '{source}' ({type(e).__name__}); pass a local directory or a hub "
            "name that is reachable or already cached."
        ) from None


_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Does a TCP connection to the Hugging Face endpoint ($HF_ENDPOINT) open within ``timeout`` seconds?
    False when HF_HUB_OFFLINE is set."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if _hub_offline():
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def _in_hub_cache(name: str, files: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(name, f), str) for f in files)
    except ValueError:  # not a valid repo id (e.g. a path that does not exist)
        return False


def check_text_sources(text_cfg: TextConfig) -> None:
    """Raise a one-sentence ValueError when the tokenizer or the pretrained encoder of ``text_cfg`` is
    a hub name that is neither a local directory nor in the local Hugging Face cache while the hub
    cannot be reached (air-gapped machine, HF_HUB_OFFLINE=1), instead of letting the driver and every
    worker retry the download before failing."""
    from huggingface_hub import constants

    missing = []
    tok = text_cfg.tokenizer or text_cfg.encoder
    if tok != TINY_TOKENIZER and not tok.endswith(".txt") and not Path(tok).is_dir() \
            and not _in_hub_cache(tok, _TOKENIZER_FILES):
        missing.append(("model.text.tokenizer" if text_cfg.tokenizer else "model.text.encoder", tok, "tokenizer files"))
    enc = text_cfg.encoder
    if text_cfg.bert_config is None and not Path(enc).is_dir() and not (
            _in_hub_cache(enc, ("config.json",)) and _in_hub_cache(enc, _WEIGHTS)):
        missing.append(("model.text.encoder", enc, "pretrained weights"))
    if not missing or hub_reachable():
        return
    key, name, what = missing[-1]
    why = "HF_HUB_OFFLINE is set" if _hub_offline() else f"{constants.ENDPOINT} cannot be reached from this machine"
    raise ValueError(
        f"{key}='{name}': its {what} are not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
        f"{why}; download it where there is network (huggingface-cli download {name}) and copy the cache "
        f"here, or set {key} to a local directory holding it")


def offline_bert_config(encoder: str) -> Any:
    """Architecture of ``encoder`` without network access (for random init / checkpoint rebuilds).

    Local directory -> its config.json; ``google/bert_uncased_L-{L}_H-{H}_A-{A}`` -> parsed from the
    name; a hub name already in the local HF cache -> the cached config; otherwise BERT-base defaults.
    """
    from transformers import AutoConfig, BertConfig

    if Path(encoder).is_dir():
        return AutoConfig.from_pretrained(encoder)
    m = _MINIATURE.search(encoder)
    if m:
        layers, hidden, heads = (int(g) for g in m.groups())
        return BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                          intermediate_size=4 * hidden)
    try:
        return AutoConfig.from_pretrained(encoder, local_files_only=True)
    except (OSError, ValueError):
        return BertConfig()


def build_bert(encoder: str, bert_config: dict | None, pretrained: bool) -> nn.Module:
    """BERT-family encoder without its pooler.

    ``bert_config`` set -> ``BertModel(BertConfig(**bert_config))`` (random init); else ``pretrained``
    -> ``AutoModel.from_pretrained(encoder)``; else random init of :func:`offline_bert_config`.
    """
    from transformers import AutoModel, BertConfig, BertModel

    if bert_config is not None:
        return BertModel(BertConfig(**bert_config), add_pooling_layer=False)
    if not pretrained:
        model = AutoModel.from_config(offline_bert_config(encoder))
    else:
        try:
            model = AutoModel.from_pretrained(encoder)
        except OSError as e:
            raise ValueError(
                f"could not load text encoder '{encoder}' ({type(e).__name__}); pass a local directory or a "
                "reachable/cached hub name, or build with pretrained=False."
            ) from None
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # unused: we pool with the BiLSTM
    return model


class TextEncoder(nn.Module):
    """BERT (any HF encoder returning ``last_hidden_state``) + BiLSTM over real tokens only.

    forward: input_ids (B, L) long, attention_mask (B, L) {0,1} right-padded
      -> words (B, L, dim) (zeros at padding), sentence (B, dim)
    """

    def __init__(self, bert: nn.Module, lstm_hidden: int = 128, dim: int = 256, freeze_encoder: bool = False) -> None:
        super().__init__()
        self.bert = bert
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            self.bert.requires_grad_(False)
        hidden = bert.config.hidden_size
        self.lstm = nn.LSTM(hidden, lstm_hidden, batch_first=True, bidirectional=True)
        self.word_proj = nn.Linear(2 * lstm_hidden, dim)
        self.sent_proj = nn.Linear(2 * lstm_hidden, dim)
        # Unit-scale outputs: they feed FiLM / gate / attention projections, and a sentence feature
        # that barely varies across sentences (the raw BiLSTM's does) makes grounding learn slowly.
        self.norm_words = nn.LayerNorm(dim)
        self.norm_sentence = nn.LayerNorm(dim)
        self.dim = dim

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.freeze_encoder:
            self.bert.train(False)  # frozen: no dropout either
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L = input_ids.shape[1]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, Hb)
        lengths = attention_mask.sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(hidden, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=L)  # (B, L, 2*lstm_hidden)
        mask = attention_mask[:, :, None].to(out.dtype)
        words = self.norm_words(self.word_proj(out)) * mask  # (B, L, dim)
        # max over real tokens: the final LSTM states are dominated by [CLS]/[SEP], the same in every sentence
        pooled = out.masked_fill(mask == 0, torch.finfo(out.dtype).min).amax(1)  # (B, 2*lstm_hidden)
        sentence = self.norm_sentence(self.sent_proj(pooled))  # (B, dim)
        return words, sentence
