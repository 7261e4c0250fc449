"""Inference: the one-image Predictor, batch evaluation and segmentation (Ray Data actors), ONNX export.

    from refseg.infer import Predictor, evaluate, segment, export_onnx, load_checkpoint_model
    p = Predictor.from_checkpoint("runs/debug/model.pt").predict("img.jpg", "the dog on the left")

- :mod:`refseg.infer.predictor` -- checkpoint -> model + preprocessing, one image at a time;
- :mod:`refseg.infer.preflight` -- the checkpoint check run before anything starts (no torch, no Ray);
- :mod:`refseg.infer.batch` -- what evaluate and segment share (argument checks, actor pool);
- :mod:`refseg.infer.evaluate` / :mod:`refseg.infer.segment` -- the batch jobs;
- :mod:`refseg.infer.visualize` -- overlays and heat maps; :mod:`refseg.infer.export` -- ONNX.

Importing this package imports neither torch nor ray (the modules import them inside functions).
The functions ``evaluate`` and ``segment`` share their names with their modules; they are bound here
eagerly, so ``refseg.infer.evaluate`` is always the function (import the modules' other names with
``from refseg.infer.evaluate import ...``).
"""

from __future__ import annotations

from refseg.infer.evaluate import evaluate
from refseg.infer.export import export_onnx
from refseg.infer.predictor import Prediction, Predictor, load_checkpoint_model
from refseg.infer.segment import segment

__all__ = ["Prediction", "Predictor", "evaluate", "export_onnx", "load_checkpoint_model", "segment"]
