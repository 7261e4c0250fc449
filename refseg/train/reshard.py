"""Restore a DeepSpeed ZeRO checkpoint saved at one world size into an engine at another.

A ZeRO-1/2/3 checkpoint holds one optimizer shard per rank (``*zero_pp_rank_<r>_*optim_states.pt``): the
flat fp32 master weights and Adam moments of that rank's partition. An engine with a different number of
ranks cannot read them as they are. DeepSpeed's universal checkpoints solve it: ``ds_to_universal``
rewrites the shards as one fp32 tensor per parameter and state (``zero/<param>/fp32.pt``,
``exp_avg.pt``, ``exp_avg_sq.pt``, ``step.pt``), and an engine loading with ``checkpoint.load_universal``
cuts its own partition out of them. The values are copied, never recomputed: fp32 master weights, Adam
moments and step counters come back bit for bit (tests/test_elastic.py).

    if saved_world(d, "ckpt") not in (None, world):
        client_state = load_resharded(engine, d, "ckpt")   # every rank, after deepspeed.initialize
    state = zero_state(d, "ckpt")                            # {param: {"fp32", "exp_avg", ...}}, any world
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import tempfile
from pathlib import Path

import torch

OPTIM_SHARD = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")


def saved_world(directory: str | Path, tag: str) -> int | None:
    """The data-parallel world size the checkpoint ``directory/tag`` was saved at: its count of ZeRO
    optimizer shards; None when it has none (ZeRO-0 keeps the whole optimizer in one file, which loads at
    any world size)."""
    ranks = {int(m.group(1)) for p in (Path(directory) / tag).iterdir() if (m := OPTIM_SHARD.fullmatch(p.name))}
    return len(ranks) or None


def to_universal(directory: str | Path, tag: str, out: str | Path) -> Path:
    """Convert the ZeRO checkpoint ``directory/tag`` into a universal checkpoint ``out/tag`` (with
    DeepSpeed's ``ds_to_universal``, in this process); returns ``out``. Its progress lines are kept and
    shown only when the conversion fails."""
    from deepspeed.checkpoint import ds_to_universal

    src, dst = Path(directory) / tag, Path(out) / tag
    args = argparse.Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # refseg's models carry no tensor-parallel info
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
    except Exception as e:
        raise RuntimeError(f"could not convert the ZeRO checkpoint {src} to a universal checkpoint ({e}); "
                           f"its log ends:\n{log.getvalue()[-2000:]}") from e
    return Path(out)


def load_resharded(engine, directory: str | Path, tag: str) -> dict:
    """Load the ZeRO checkpoint ``directory/tag``, saved at any world size, into ``engine`` (every rank
    calls it): model, fp32 master weights, Adam moments, step counters, LR scheduler; returns the
    checkpoint's client state.

    Each rank converts the checkpoint into its own temporary universal copy (a rank may be the only one
    on its node, with its own download of the checkpoint) and loads that with DeepSpeed's universal
    loader. DeepSpeed reads ``checkpoint.load_universal`` only while loading, so it is switched on for
    this one load rather than in the config the engine was built from."""
    with tempfile.TemporaryDirectory(prefix="refseg-universal-") as tmp:
        to_universal(directory, tag, tmp)
        config = engine._config  # DeepSpeedConfig: its load_universal_checkpoint is the config key's value
        before, config.load_universal_checkpoint = config.load_universal_checkpoint, True
        try:
            _, client = engine.load_checkpoint(tmp, tag=tag)
        finally:
            config.load_universal_checkpoint = before
    return client or {}


def zero_state(directory: str | Path, tag: str) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's optimizer state in the ZeRO checkpoint ``directory/tag``, whole and in fp32,
    whatever world size saved it: ``{name: {"fp32", "exp_avg", "exp_avg_sq", "step"?}}``. Two checkpoints
    of the same training state compare equal here whatever their world sizes and ZeRO partitioning."""
    with tempfile.TemporaryDirectory(prefix="refseg-universal-") as tmp:
        zero = to_universal(directory, tag, tmp) / tag / "zero"
        state = {}
        for param in sorted(p for p in zero.iterdir() if p.is_dir()):
            state[param.name] = {f.stem: unwrap(torch.load(f, map_location="cpu", weights_only=True))
                                 for f in sorted(param.glob("*.pt"))}
    return state


def unwrap(saved: dict | torch.Tensor) -> torch.Tensor:
    """A universal checkpoint's tensor: ZeRO-1/2 files hold ``{"param": tensor, ...}``, ZeRO-3 ones the tensor."""
    return saved["param"] if isinstance(saved, dict) else saved

