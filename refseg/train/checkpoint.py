"""Checkpoints: the run state, save / restore inside a worker, and the export to ``model.pt``.

A checkpoint dir holds DeepSpeed's files under ``ckpt/`` (every rank's ZeRO shard), the resolved
``config.yaml`` and ``refseg_state.json`` (:class:`RunState`, also kept in DeepSpeed's client state).

    save_checkpoint(engine, directory, cfg, state, rank)     # every rank
    state = load_checkpoint(engine, directory)
    export_checkpoint(directory, out / "model.pt")            # offline: no Ray, any ZeRO stage
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from refseg.config import Config, config_from_dict, load_yaml

CKPT_TAG = "ckpt"
STATE_FILE = "refseg_state.json"
LOCAL_CHECKPOINTS = "checkpoints"  # Ray Train local mode: <output_dir>/checkpoints/epoch_NNNN


@dataclasses.dataclass
class RunState:
    """The run's progress, saved in every checkpoint (``to_dict`` is the JSON of refseg_state.json).

    ``history``: one metrics dict per finished epoch (what metrics.jsonl lists). The ``budget_*`` fields
    and ``epochs`` exist with ``train.time_budget_s`` only: the ``time.time()`` the current
    ``refseg train`` call started, the budget seconds earlier calls spent and all calls together, and
    the epoch count fitted to the budget."""

    epoch: int = 0  # epochs finished
    global_step: int = 0  # optimizer steps taken
    history: list[dict] = dataclasses.field(default_factory=list)
    budget_t0: float | None = None
    budget_spent_before_s: float | None = None
    budget_used_s: float | None = None
    epochs: int | None = None

    def to_dict(self) -> dict:
        """The JSON form; the fields that are None are left out (a run without a budget has none)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> RunState:
        return cls(**data)


def save_checkpoint(engine, directory: Path, cfg: Config, state: RunState, rank: int) -> None:
    """Every rank writes its ZeRO shard; rank 0 adds the resolved config and the run state."""
    engine.save_checkpoint(str(directory), tag=CKPT_TAG, client_state={"refseg": state.to_dict()})
    if rank == 0:
        (directory / "config.yaml").write_text(cfg.to_yaml())
        (directory / STATE_FILE).write_text(json.dumps(state.to_dict(), indent=1))


def load_checkpoint(engine, directory: Path) -> RunState:
    """Restore model, optimizer, LR schedule and the refseg run state from a checkpoint dir."""
    _, client = engine.load_checkpoint(str(directory), tag=CKPT_TAG)
    if client and "refseg" in client:
        return RunState.from_dict(dict(client["refseg"]))
    return read_state(directory)


def read_state(directory: Path) -> RunState:
    """The run state a checkpoint dir holds (its refseg_state.json), without DeepSpeed."""
    return RunState.from_dict(json.loads((directory / STATE_FILE).read_text()))


def local_checkpoint_dir(output_dir: str | Path, epoch: int) -> Path:
    """Where Ray Train local mode keeps the checkpoint of 1-based ``epoch``."""
    return Path(output_dir) / LOCAL_CHECKPOINTS / f"epoch_{epoch:04d}"


def save_and_report(engine, cfg: Config, state: RunState, metrics: dict, rank: int, output_dir: str,
                    local: bool) -> None:
    """Save a checkpoint of every rank and ``ray.train.report`` it with the epoch's ``metrics``.

    Local mode keeps the dir under ``output_dir`` (Ray Train keeps only a reference there); otherwise
    Ray copies a temporary dir into the run's storage."""
    import shutil
    import tempfile

    import ray.train
    from ray.train import Checkpoint

    if local:
        directory = local_checkpoint_dir(output_dir, state.epoch)
        directory.mkdir(parents=True, exist_ok=True)
        save_checkpoint(engine, directory, cfg, state, rank)
        ray.train.report(metrics)
        return
    directory = Path(tempfile.mkdtemp(prefix="refseg-ckpt-"))
    try:
        save_checkpoint(engine, directory, cfg, state, rank)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(directory)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def export_checkpoint(ckpt_dir: str | Path, out_path: str | Path) -> Path:
    """DeepSpeed checkpoint dir (any ZeRO stage) -> ``model.pt`` (fp32 weights + resolved config).

    The file loads with ``refseg.models.export.load_model`` — no DeepSpeed or Ray needed.
    """
    from refseg.models import build_model
    from refseg.models.export import save_model
    from refseg.train.zero_reader import fp32_state_dict

    ckpt_dir = Path(ckpt_dir)
    cfg = config_from_dict(load_yaml(ckpt_dir / "config.yaml"))
    state = fp32_state_dict(ckpt_dir, CKPT_TAG)  # unpickles no code: a crafted file is one sentence
    model = build_model(cfg.model, pretrained=False)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers_only = all(k.endswith(("num_batches_tracked",)) for k in missing)
    if unexpected or not buffers_only:
        raise RuntimeError(f"checkpoint {ckpt_dir} does not match the model: missing={missing[:5]} "
                           f"unexpected={unexpected[:5]}")
    out_path = Path(out_path)
    save_model(out_path, model.float(), cfg.to_dict())
    return out_path
