"""DeepSpeed checkpoints read without unpickling code: the consolidated weights of any ZeRO stage.

    state = fp32_state_dict(Path("runs/x/checkpoints/epoch_0002"), "ckpt")   # {name: tensor} on the CPU

Every file is read by ``torch.load(weights_only=True)``. Besides tensors, DeepSpeed's files pickle a few
bookkeeping objects (:data:`ALLOWED_GLOBALS`: the loss scaler, ZeRO's stage enum, fragment addresses,
numpy scalars in the client state); each is rebuilt as an inert stand-in (the stage as a plain ``int``),
so no code from the file runs. A file that needs any other global is refused with a
:class:`CheckpointError` naming the file and the globals, before it is unpickled.

For ZeRO 1-3 the result equals DeepSpeed's ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(dir,
tag)`` tensor for tensor: trainable parameters from the fp32 master partitions of every rank's
``*_optim_states.pt``, buffers (as fp32) and frozen parameters (their saved dtype) from the model states.
A ZeRO-0 checkpoint (no optimizer shard files) gives its module states, floating tensors as fp32.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from refseg.config import ConfigError

ADVICE = "convert it with DeepSpeed's zero_to_fp32.py on a machine you trust"


class CheckpointError(ConfigError):
    """A checkpoint file refseg will not unpickle or cannot read; the message names the file."""


class _Inert:
    """Stand-in for a non-tensor object DeepSpeed pickles: keeps its arguments and state, runs nothing."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


# pickled global (module.name) -> what the weights-only unpickler builds in its place
ALLOWED_GLOBALS: dict[str, type] = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": _Inert,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": _Inert,  # fp16 engines
    "deepspeed.utils.tensor_fragment.fragment_address": _Inert,  # ZeRO 1/2 param_slice_mappings
    "deepspeed.runtime.zero.config.ZeroStageEnum": int,
    "numpy._core.multiarray.scalar": _Inert,  # numpy scalars in the client state (metrics history)
    "numpy.core.multiarray.scalar": _Inert,  # the same, pickled by numpy < 2
    "numpy.dtype": _Inert,
}


def load_checkpoint_file(path: Path) -> Any:
    """The object in one DeepSpeed ``.pt`` file, tensors on the CPU; its non-tensor objects are only
    those of :data:`ALLOWED_GLOBALS` (stand-ins). Raises :class:`CheckpointError` for anything else."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a torch zip file: torch.load below names the problem
        found = []
    refused = sorted(set(found) - set(ALLOWED_GLOBALS))
    if refused:
        raise CheckpointError(f"checkpoint file '{path}' contains pickled objects other than tensors "
                              f"({', '.join(refused)}); refseg will not unpickle it; {ADVICE}")
    try:
        with torch.serialization.safe_globals([(v, k) for k, v in ALLOWED_GLOBALS.items()]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - damaged, foreign or crafted file: one sentence, nothing run
        raise CheckpointError(f"checkpoint file '{path}' could not be read safely ({type(e).__name__}); "
                              f"it is damaged or not a DeepSpeed checkpoint file; {ADVICE}") from None


def _natural_key(path: Path) -> list:
    """``zero_pp_rank_10`` after ``zero_pp_rank_9`` (DeepSpeed's file order)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _files(tag_dir: Path, pattern: str) -> list[Path]:
    return sorted(tag_dir.glob(pattern), key=_natural_key)


def fp32_state_dict(ckpt_dir: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """The consolidated weights (parameters and buffers, by name) in ``<ckpt_dir>/<tag>``, any ZeRO stage.

    Raises :class:`CheckpointError` (one sentence) for a file that is missing, damaged, holds pickled
    objects other than DeepSpeed's, or shards that do not add up."""
    tag_dir = Path(ckpt_dir) / tag
    model_files = _files(tag_dir, "*_model_states.pt")
    if not model_files:
        raise CheckpointError(f"checkpoint '{tag_dir}' holds no DeepSpeed model states (*_model_states.pt); "
                              "pass a checkpoint directory written by refseg train, or its model.pt")
    models = [load_checkpoint_file(f) for f in model_files]
    optims = [load_checkpoint_file(f) for f in _files(tag_dir, "*_optim_states.pt")]
    try:
        stage = int(optims[0]["optimizer_state_dict"].get("zero_stage", 0)) if optims else 0
        if stage == 0:
            return {k: v.float() if v.is_floating_point() else v for k, v in models[0]["module"].items()}
        return _consolidate(tag_dir, stage, models, [o["optimizer_state_dict"] for o in optims])
    except CheckpointError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint '{tag_dir}' does not have the layout DeepSpeed writes "
                              f"({type(e).__name__}: {e}); pass a checkpoint directory written by refseg "
                              "train") from None


def _consolidate(tag_dir: Path, stage: int, models: list[dict], optims: list[dict]) -> dict[str, torch.Tensor]:
    """ZeRO 1-3: buffers, frozen and trainable parameters, then shared (tied) names, as zero_to_fp32."""
    world = optims[0]["partition_count"]
    world = max(world) if isinstance(world, list) else int(world)
    if world != len(optims):
        raise CheckpointError(f"checkpoint '{tag_dir}' holds {len(optims)} *_optim_states.pt files but was saved "
                              f"with world size {world}; copy exactly that checkpoint's files, one per rank")
    first = models[0]
    buffers = set(first["buffer_names"])
    state: dict[str, torch.Tensor] = OrderedDict(
        (k, v.float() if v.is_floating_point() else v) for k, v in first["module"].items() if k in buffers)
    frozen = first.get("frozen_param_shapes") or {}
    for name, shape in frozen.items():
        if stage <= 2:
            state[name] = first["frozen_param_fragments"][name]
        else:
            parts = [m["frozen_param_fragments"][name] for m in models]
            state[name] = torch.cat(parts, 0).narrow(0, 0, math.prod(shape)).view(shape)
    if stage <= 2:
        groups = [o["single_partition_of_fp32_groups"] for o in optims]
        _merge_zero12(state, tag_dir, world, first["param_shapes"], groups, optims[0].get("param_alignment_paddings"))
    else:
        _merge_zero3(state, tag_dir, world, first["param_shapes"], [o["fp32_flat_groups"] for o in optims])
    for name, source in (first.get("shared_params") or {}).items():
        if source in state:
            state[name] = state[source]
    return state


def _mismatch(tag_dir: Path, used: int, held: int) -> CheckpointError:
    return CheckpointError(f"checkpoint '{tag_dir}' is inconsistent: its parameter shapes take {used} values "
                           f"but its ZeRO shards hold {held}; copy the complete checkpoint directory again")


def _merge_zero12(state: dict, tag_dir: Path, world: int, param_shapes: list[dict],
                  groups: list[list[torch.Tensor]], paddings: list[list[int]] | None) -> None:
    """ZeRO 1/2: each param group's flat fp32 vector is the ranks' partitions end to end; parameters lie
    in it in ``param_shapes`` order, each followed by its alignment padding (when recorded)."""
    align = 2 * world  # the group's flat vector is padded to a multiple of 2 x world

    def aligned(n: int) -> int:
        return align * math.ceil(n / align)

    for g, shapes in enumerate(param_shapes):
        flat = torch.cat([rank_groups[g] for rank_groups in groups], 0)
        pads = paddings[g] if paddings is not None else None
        if pads is not None and len(pads) != len(shapes):
            raise CheckpointError(f"checkpoint '{tag_dir}' records {len(pads)} alignment paddings for the "
                                  f"{len(shapes)} parameters of group {g}; copy the complete checkpoint again")
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            n = math.prod(shape)
            state[name] = flat.narrow(0, offset, n).view(shape)
            offset += n + (pads[i] if pads is not None else 0)
        if aligned(offset) != aligned(flat.numel()):
            raise _mismatch(tag_dir, offset, flat.numel())


def _merge_zero3(state: dict, tag_dir: Path, world: int, param_shapes: list[dict],
                 groups: list[list[torch.Tensor]]) -> None:
    """ZeRO 3: every parameter is split into ``world`` equal (end-padded) parts, part r on rank r; a
    rank's parts follow each other across its flat groups in ``param_shapes`` order."""
    sizes = [t.numel() for t in groups[0]]
    starts = [sum(sizes[:g]) for g in range(len(sizes) + 1)]  # group g holds [starts[g], starts[g+1])
    offset = 0
    merged = {k: v for shapes in param_shapes for k, v in shapes.items()}
    for name, shape in merged.items():
        n = math.prod(shape)
        part = math.ceil(n / world)
        chunks = []
        for rank_groups in groups:
            for g, flat in enumerate(rank_groups):
                lo, hi = max(offset, starts[g]), min(offset + part, starts[g + 1])
                if lo < hi:
                    chunks.append(flat[lo - starts[g]:hi - starts[g]])
        state[name] = torch.cat(chunks, 0)[:n].view(shape).contiguous()
        offset += part
    if offset != starts[-1]:
        raise _mismatch(tag_dir, offset * world, starts[-1] * world)
