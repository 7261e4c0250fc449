"""One rank of a real DeepSpeed group on gloo (CPU) that trains, saves or reshards ZeRO checkpoints.

    RANK=r WORLD_SIZE=w MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/zero_reshard_worker.py train OUT
    ... python tests/zero_reshard_worker.py reload SRC OUT
    ... python tests/zero_reshard_worker.py set OUT

For every (ZeRO stage, precision) of ``CASES`` it builds a DeepSpeed engine over a tiny model with
refseg's DeepSpeed config (:func:`refseg.train.engine.build_deepspeed_config`), then ``train``: three
AdamW steps on rank-dependent data, saved with :func:`refseg.train.checkpoint.save_checkpoint` into
``OUT/<case>``; or ``reload``: :func:`refseg.train.checkpoint.load_checkpoint` of ``SRC/<case>`` (saved
at any world size) and a save of what it restored into ``OUT/<case>``. Rank 0 prints one JSON line per
case (``@@{...}``) with the restored run state, step counters and learning rates. ``set`` (over
``SET_CASES``, ZeRO-0 too): the three steps, then :func:`refseg.train.refit.set_parameters` writes
:func:`set_value` into the first layer's weight, and the report adds what the module and DeepSpeed's
fp32 master copy hold then (``module``, ``master``: null without one) before the save.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

CASES = [(1, "bf16"), (2, "fp32"), (3, "bf16")]  # every ZeRO stage, both CPU precisions
SET_CASES = [(0, "fp32"), (0, "bf16"), *CASES]


def set_value() -> torch.Tensor:
    """What ``set`` writes into the first layer's weight (7, 5)."""
    return torch.arange(35, dtype=torch.float32).reshape(7, 5) / 8


def tiny_model() -> torch.nn.Module:
    """Odd widths, so that the flat ZeRO partitions of 2 ranks split parameters and need padding."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.ReLU(), torch.nn.Linear(7, 3))


def engine_for(stage: int, precision: str):
    import deepspeed

    from refseg.config import Config
    from refseg.train.engine import build_deepspeed_config

    cfg = Config()
    cfg.train.batch_size, cfg.train.precision, cfg.deepspeed.zero_stage = 2, precision, stage
    model = tiny_model()
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_deepspeed_config(cfg.train, cfg.deepspeed, cuda=False))
    return cfg, engine


def main(mode: str, *dirs: str) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from refseg.train.checkpoint import RunState, load_checkpoint, save_checkpoint
    from refseg.train.refit import set_parameters

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    for stage, precision in SET_CASES if mode == "set" else CASES:
        case = f"zero{stage}_{precision}"
        cfg, engine = engine_for(stage, precision)
        extra = {}
        if mode in ("train", "set"):
            data = torch.Generator().manual_seed(100 + rank)
            for _ in range(3):
                x = torch.randn(2, 5, generator=data).to(engine.module[0].weight.dtype)
                engine.backward(engine(x).float().pow(2).mean())
                engine.step()
            state = RunState(epoch=1, global_step=3)
            if mode == "set":
                set_parameters(engine, {"0.weight": set_value()})
                weight = engine.module[0].weight
                with deepspeed.zero.GatheredParameters([weight], enabled=hasattr(weight, "ds_id")):
                    extra["module"] = weight.detach().float().tolist()
                master = safe_get_full_fp32_param(weight)
                extra["master"] = None if master is None else master.tolist()
        else:
            state = load_checkpoint(engine, Path(dirs[0]) / case)
        out = Path(dirs[-1]) / case
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(engine, out, cfg, state, rank)
        torch.distributed.barrier()
        if rank == 0:
            print("@@" + json.dumps({"case": case, "state": state.to_dict(), "global_steps": engine.global_steps,
                                     "lr": engine.get_lr(), **extra}), flush=True)
        del engine
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
