"""refseg: referring image segmentation at cluster scale (Ray Data + Ray Train + DeepSpeed + Ray Tune).

    from refseg import Predictor
    pred = Predictor.from_checkpoint("runs/debug/model.pt").predict("img.jpg", "the left red circle")

Importing refseg has no side effects and does not import torch or ray.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Predictor", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Predictor":
        from refseg.infer import Predictor

        return Predictor
    raise AttributeError(f"module 'refseg' has no attribute {name!r}")
