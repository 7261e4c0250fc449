"""Export a checkpoint to ONNX and check it against PyTorch with onnxruntime.

    info = export_onnx("runs/debug/model.pt", "model.onnx")   # info["max_abs_diff"] < 1e-3

Graph: inputs ``image`` float32 (B, 3, S, S) ImageNet-normalised, ``input_ids`` int64 (B, L) and
``attention_mask`` int64 (B, L) (right-padded, L = data.max_tokens) -> ``logits`` float32 (B, 1, S, S)
(+ ``no_target_logit`` float32 (B,) for a model with the no-target head: sigmoid > the threshold in
``<out>.json`` = nothing is referred, the mask is empty); B is dynamic, S (data.image_size) and L are fixed by the checkpoint. ``<out>.json`` records S, L,
keep_aspect, the tokenizer source and the normalisation, i.e. everything a runtime needs.
Uses the TorchScript exporter (``dynamo=False``), which handles the packed BiLSTM.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from refseg.config import ConfigError
from refseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, tokenize
from refseg.infer.predictor import Predictor
from refseg.infer.preflight import check_checkpoint
from refseg.io import atomic_path, check_output_file, write_text_atomic

INPUTS = ("image", "input_ids", "attention_mask")
TOLERANCE = 1e-3  # max |p_onnx - p_torch| over probabilities
SAMPLE_TEXTS = ("the red circle on the left", "a small blue square", "biggest shape", "the one in the middle")


def output_names(model: Any) -> tuple[str, ...]:
    """The graph's outputs: ``logits``, and ``no_target_logit`` when the model has the no-target head."""
    return ("logits", "no_target_logit") if getattr(model, "no_target", None) is not None else ("logits",)


def _logits_module(model: Any) -> Any:
    """(image, input_ids, attention_mask) -> the tensors of :func:`output_names`, as an nn.Module in eval mode."""
    import torch

    names = output_names(model)

    class LogitsOnly(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, image: Any, input_ids: Any, attention_mask: Any) -> Any:
            out = self.m(image, input_ids, attention_mask)
            return tuple(out[k] for k in names)

    # eval() on the WRAPPER too: the exporter restores the wrapper's mode afterwards, and a fresh module
    # is in training mode, which would switch dropout / batch-norm training on inside `model`.
    return LogitsOnly(model).eval()


def sample_inputs(predictor: Predictor, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random normalised images and tokenised sample texts: the feed of the graph for ``batch`` samples."""
    rng = np.random.default_rng(seed)
    s = predictor.image_size
    texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(batch)]
    ids, am = tokenize(predictor.tokenizer, texts, predictor.max_tokens)
    return {"image": rng.standard_normal((batch, 3, s, s)).astype(np.float32), "input_ids": ids, "attention_mask": am}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def verify_onnx(path: str | os.PathLike, predictor: Predictor, batches: tuple[int, ...] = (2, 1, 3)) -> float:
    """Max |sigmoid(onnx output) - sigmoid(torch output)| over random images of each batch size and every
    output (the mask logits, and the no-target logit when the model has the head)."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = predictor.model.float().cpu().eval()
    names = output_names(model)
    worst = 0.0
    for i, b in enumerate(batches):
        feed = sample_inputs(predictor, b, seed=i)
        with torch.inference_mode():
            out = model(*(torch.from_numpy(feed[k]) for k in INPUTS))
        for name, got in zip(names, sess.run(list(names), feed)):
            ref = out[name].numpy()
            if got.shape != ref.shape:
                raise RuntimeError(f"ONNX output {name} shape {got.shape} != PyTorch {ref.shape} at batch {b}")
            worst = max(worst, float(np.abs(_sigmoid(got) - _sigmoid(ref)).max()))
    return worst


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, opset: int = 17, verify: bool = True) -> dict:
    """Write ``out`` (+ ``out``.json) and return {path, opset, image_size, max_tokens, max_abs_diff}.

    A checkpoint refseg cannot load or an ``out`` that cannot be written is refused first (ConfigError)."""
    check_checkpoint(checkpoint)
    check_output_file(out, "--out")
    import torch

    predictor = Predictor.from_checkpoint(checkpoint, "cpu")
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _logits_module(predictor.model.float().eval())
    names = output_names(predictor.model)
    feed = sample_inputs(predictor, 2)
    dyn = {k: {0: "batch"} for k in (*INPUTS, *names)}
    try:
        with atomic_path(out) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter (shape asserts on fixed S / L)
            torch.onnx.export(wrapper, tuple(torch.from_numpy(feed[k]) for k in INPUTS), str(tmp),
                              input_names=list(INPUTS), output_names=list(names), dynamic_axes=dyn,
                              opset_version=opset, dynamo=False)
    except Exception as e:
        raise RuntimeError(f"ONNX export of '{checkpoint}' failed ({type(e).__name__}: {e})") from e
    predictor.model.eval()
    cfg = predictor.config
    text = cfg.model.text
    meta = {"inputs": {"image": ["batch", 3, predictor.image_size, predictor.image_size],
                       "input_ids": ["batch", predictor.max_tokens], "attention_mask": ["batch", predictor.max_tokens]},
            "outputs": {"logits": ["batch", 1, predictor.image_size, predictor.image_size],
                        **({"no_target_logit": ["batch"]} if "no_target_logit" in names else {})},
            "image_size": predictor.image_size, "keep_aspect": predictor.keep_aspect,
            "max_tokens": predictor.max_tokens, "tokenizer": text.tokenizer or text.encoder,
            "mean": [round(float(v), 6) for v in IMAGENET_MEAN], "std": [round(float(v), 6) for v in IMAGENET_STD], "opset": opset,
            "threshold_note": "mask = sigmoid(logits) > 0.5, warped back to the original size bilinearly"}
    if "no_target_logit" in names:
        meta["no_target_threshold"] = predictor.no_target_threshold
        meta["no_target_note"] = ("sigmoid(no_target_logit) > no_target_threshold: the expression refers to "
                                  "nothing; the mask is empty")
    info = {"path": str(out), "opset": opset, "image_size": predictor.image_size, "max_tokens": predictor.max_tokens}
    if verify:
        info["max_abs_diff"] = verify_onnx(out, predictor)
        meta["verified_max_abs_diff"] = info["max_abs_diff"]
    write_text_atomic(f"{out}.json", json.dumps(meta, indent=1))
    return info


def check_opset(opset: int) -> None:
    """Refuse an ONNX opset outside 11..23."""
    if not 11 <= opset <= 23:
        raise ConfigError(f"--opset {opset} is outside the supported range 11..23; use 17")
