"""What ``evaluate`` and ``segment`` share: their argument checks, the checkpoint shipped to the actors,
and the Ray Data actor pool over Arrow blocks of exactly one batch each.

    check_batch_args(checkpoint, output, workers, batch_size, threshold)   # ConfigError naming the flag
    box, cfg = ship_checkpoint("runs/debug/model.pt")      # the model's files in the object store
    ds = actor_pool(EvalActor, rows, {"box": box, ...}, workers=2, batch_size=16)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from refseg.config import ConfigError
from refseg.infer.predictor import Predictor, load_checkpoint_model, resolve_checkpoint
from refseg.infer.preflight import MODEL_FILE, check_checkpoint
from refseg.io import check_output_dir, is_uri
from refseg.runtime import actor_options


def check_batch_args(checkpoint: str | os.PathLike, output: str | os.PathLike, workers: int, batch_size: int,
                     threshold: float) -> None:
    """Refuse, before anything starts (no torch, no Ray, nothing created): ``workers`` or ``batch_size``
    below 1, a threshold outside (0, 1), a checkpoint refseg cannot load (:func:`check_checkpoint`), an
    ``--output`` that is a URI or cannot be a local directory."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"--threshold must lie strictly between 0 and 1, got {threshold}")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    check_checkpoint(checkpoint)
    if is_uri(output):
        raise ConfigError(f"--output '{output}' must be a local directory (files are written atomically there)")
    check_output_dir(output, "--output")


def ship_checkpoint(checkpoint: str | os.PathLike) -> tuple[list, Any]:
    """Put the model's files in the object store (actors on other nodes need no shared disk): a
    model.pt's bytes, or every file of an artifact folder, as ``{name: bytes}``.

    Returns ([ObjectRef], the checkpoint's Config). A DeepSpeed dir is consolidated first."""
    import ray

    with tempfile.TemporaryDirectory(prefix="refseg-ckpt-") as tmp:
        model = resolve_checkpoint(checkpoint, tmp)
        _, cfg = load_checkpoint_model(model, "cpu")  # validates the files before any actor starts
        files = ({f.name: f.read_bytes() for f in model.iterdir() if f.is_file()} if model.is_dir()
                 else {MODEL_FILE: model.read_bytes()})
        box = [ray.put(files)]
    return box, cfg


def predictor_from_box(box: list, compile: bool = False) -> Predictor:
    """Inside an actor: the Predictor for the model files in ``box`` (CUDA when visible)."""
    import ray
    import torch

    files = ray.get(box[0])
    with tempfile.TemporaryDirectory(prefix="refseg-actor-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return Predictor.from_checkpoint(tmp, "cuda" if torch.cuda.is_available() else "cpu", compile=compile)


def batch_blocks(items: list[dict], batch_size: int) -> list:
    """Arrow tables of exactly ``batch_size`` rows (the last may be short), one Ray Data block each.

    With ``map_batches(batch_size=batch_size)`` every batch is then one whole block, so batches (and
    results) do not depend on the number of actors; Ray Data refuses ``batch_size=None`` for GPU
    actors, which is why the size is explicit."""
    import pyarrow as pa

    return [pa.Table.from_pylist(items[i: i + batch_size]) for i in range(0, len(items), batch_size)]


def actor_pool(actor: type, items: list[dict], kwargs: dict, *, workers: int, batch_size: int) -> Any:
    """A Ray Dataset of ``items`` mapped by a pool of ``workers`` ``actor(**kwargs)`` instances, one
    batch (numpy format) per call; the actors' resources come from :func:`refseg.runtime.actor_options`."""
    import ray.data

    opts = actor_options(workers)
    ds = ray.data.from_arrow(batch_blocks(items, batch_size))
    return ds.map_batches(actor, batch_size=batch_size, batch_format="numpy", fn_constructor_kwargs=kwargs,
                          compute=ray.data.ActorPoolStrategy(size=workers), **opts)
