"""DeepSpeed inside a Ray Train worker: its JSON config, the LR schedule, the engine, the collectives.

    engine, scheduler = setup_engine(cfg, total_steps, pick_device(cfg.train.use_gpu))
    image, ids, attn, mask = to_inputs(batch, device, engine_dtype(cfg))
    steps = all_reduce_min(steps)          # every rank agrees (1 without a process group)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from refseg.config import Config, ConfigError, DeepSpeedConfig, TrainConfig
from refseg.config.validate import validate_deepspeed, validate_precision
from refseg.data.transforms import normalize_images


# ----------------------------------------------------------------------------- DeepSpeed config
def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def build_deepspeed_config(train: TrainConfig, ds: DeepSpeedConfig, cuda: bool) -> dict:
    """The DeepSpeed JSON for one engine: ZeRO stage, precision, accumulation, clipping.

    ``ds.config_file`` (a DeepSpeed JSON) is merged under the generated keys' defaults and
    ``ds.extra`` is merged last, so any raw DeepSpeed key can be set from YAML.
    """
    validate_precision(train.precision, cuda)  # the device this engine runs on
    validate_deepspeed(ds)
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage > 0:
        zero["contiguous_gradients"] = True
        if ds.overlap_comm:
            zero["overlap_comm"] = True
    if ds.offload_optimizer and ds.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    config = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {
            "enabled": train.precision == "fp16",
            "loss_scale": 0,  # dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.config_file:
        path = Path(ds.config_file)
        if not path.is_file():
            raise ConfigError(f"deepspeed.config_file '{path}' does not exist; fix the path or remove the key")
        try:
            from_file = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed.config_file '{path}' is not valid JSON: {e}") from None
        file_stage = from_file.get("zero_optimization", {}).get("stage")
        if file_stage is not None and file_stage != ds.zero_stage:
            raise ConfigError(
                f"deepspeed.config_file '{path}' sets ZeRO stage {file_stage} but deepspeed.zero_stage="
                f"{ds.zero_stage}; set deepspeed.zero_stage={file_stage} (the config key decides)"
            )
        # The file supplies defaults (e.g. bucket sizes); the refseg keys above stay authoritative,
        # except "zero_optimization" sub-keys the file adds.
        config = _deep_merge(from_file, config)
        if "zero_optimization" in from_file:
            config["zero_optimization"] = _deep_merge(from_file["zero_optimization"], zero)
    config.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accumulation x world
    return _deep_merge(config, ds.extra)


def accumulation(train: TrainConfig, world: int) -> tuple[int, str | None]:
    """The gradient accumulation at ``world`` workers that keeps the global batch ``batch_size x max
    workers x grad_accum`` (``train.num_workers`` [min, max] = elastic: fewer workers accumulate more, so
    the LR schedule and the results do not depend on how many were alive). Returns it with a sentence
    saying what was chosen when the global batch cannot be kept exactly (else None)."""
    target = train.worker_range()[1] * train.grad_accum  # micro-batches per optimizer step, all workers
    if target % world == 0:
        return target // world, None
    accum = max(1, round(target / world))
    return accum, (
        f"the global batch of {target * train.batch_size} (train.batch_size={train.batch_size} x "
        f"{target} micro-batches) does not split over {world} workers: accumulating {accum} micro-batches, a "
        f"global batch of {accum * world * train.batch_size}, the nearest that keeps train.batch_size (which "
        "sizes each worker's memory)")


class PolySchedule:
    """Linear warmup then polynomial decay (LAVT: power 0.9 per iteration), as an LR multiplier.

    A callable object rather than a closure: ``LambdaLR.state_dict`` saves an object's attributes, so a
    checkpoint keeps ``total_steps`` when ``train.time_budget_s`` re-fits it mid-run (``set_total``)."""

    def __init__(self, total_steps: int, warmup_steps: int, power: float) -> None:
        self.warmup_steps = max(0, int(warmup_steps))
        self.power = float(power)
        self.set_total(total_steps)

    def set_total(self, total_steps: int) -> None:
        self.total_steps = max(1, int(total_steps))

    def __call__(self, step: int) -> float:
        warmup = min(self.warmup_steps, self.total_steps - 1)
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return max(0.0, 1.0 - min(progress, 1.0)) ** self.power


def lr_lambda(total_steps: int, warmup_steps: int, power: float) -> PolySchedule:
    """The LR multiplier of ``LambdaLR`` for this run: see :class:`PolySchedule`."""
    return PolySchedule(total_steps, warmup_steps, power)


# ----------------------------------------------------------------------------- the engine
def pick_device(use_gpu: bool) -> torch.device:
    """This worker's GPU (``LOCAL_RANK``) when ``use_gpu`` and CUDA is there, else the CPU."""
    if use_gpu and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def engine_dtype(cfg: Config) -> torch.dtype:
    """The dtype of the engine's parameters and of its input images (train.precision)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)


def setup_engine(cfg: Config, total_steps: int, device: torch.device, init: Any = None, fused_adamw: bool = True):
    """Build the model, AdamW (two LR groups), warmup+poly schedule and the DeepSpeed engine.

    ``init(model)``, when given, runs on the built model before DeepSpeed copies its weights (a fresh
    run's ``train.init_from``). ``fused_adamw``: PyTorch's fused AdamW kernel (CUDA and CPU; False: the
    per-tensor loop, as CPU runs had before issue 26). Returns ``(engine, LambdaLR scheduler)``;
    ``total_steps`` optimizer steps end the schedule."""
    import deepspeed

    from refseg.models import build_model

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, pretrained=True)
    if init is not None:
        init(model)
    groups = model.param_groups(cfg.train.lr, cfg.train.encoder_lr_mult, cfg.train.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.999), fused=fused_adamw)
    warmup = cfg.train.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup, cfg.train.poly_power)
    )
    ds_config = build_deepspeed_config(cfg.train, cfg.deepspeed, cuda=device.type == "cuda")
    if cfg.train.precision == "bf16":
        # DeepSpeed casts parameters only; BatchNorm's fp32 running stats then fail on CPU
        # ("expected scalar type BFloat16"). Cast the whole module (buffers included) up front:
        # the fp32 master weights DeepSpeed keeps start from the same values.
        model = model.to(torch.bfloat16)
    # No channels_last weights: DeepSpeed broadcasts each parameter as a byte view (fails on a
    # non-unit last stride) and ZeRO re-points parameters into flat contiguous buffers anyway.
    # The input batch is channels_last instead (to_inputs).
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if cfg.train.compile:
        engine.compile()  # nn.Module.compile in place: checkpoints keep their parameter names
    return engine, scheduler


def to_inputs(batch: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Ray Data numpy/torch batch -> (image (B,3,S,S) channels_last, ids (B,L), attn (B,L), mask (B,S,S)).

    The uint8 pixels (and {0,1} uint8 mask) cross to the device as they are, a quarter of float32's
    bytes, and are normalised there (:func:`~refseg.data.transforms.normalize_images`; a float image is
    taken as normalised already); the image then gets ``dtype``, the mask float32. channels_last
    images keep the convolutions' activations NHWC: cuDNN's bf16 kernels and oneDNN's CPU kernels run
    faster on them (bench/gpu.py, bench/cpu_step.py); the values are the same."""
    image = normalize_images(torch.as_tensor(batch["image"]).to(device, non_blocking=True))
    image = image.to(dtype=dtype, memory_format=torch.channels_last)
    ids = torch.as_tensor(batch["input_ids"]).to(device, dtype=torch.long, non_blocking=True)
    attn = torch.as_tensor(batch["attention_mask"]).to(device, dtype=torch.long, non_blocking=True)
    mask = torch.as_tensor(batch["mask"]).to(device, dtype=torch.float32, non_blocking=True)
    return image, ids, attn, mask


# ----------------------------------------------------------------------------- collectives
def world_size() -> int:
    """Ranks in the process group (1 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def collective_device() -> torch.device:
    """Where the process group's tensors live: this rank's GPU under NCCL (it has no CPU tensors), else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of CPU tensor ``t`` over every rank (a copy; ``t`` itself with one rank)."""
    if world_size() > 1:
        t = t.to(collective_device(), copy=True)
        torch.distributed.all_reduce(t)
        t = t.cpu()
    return t


def all_reduce_min(n: int) -> int:
    """The smallest ``n`` any rank holds: every rank then runs the same number of steps / epochs."""
    if world_size() > 1:
        t = torch.tensor([n], dtype=torch.int64, device=collective_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        n = int(t.item())
    return n


def all_gather_objects(obj: Any) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` with one rank)."""
    if world_size() > 1:
        out: list = [None] * world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def average_norm_stats(model: torch.nn.Module) -> int:
    """Average BatchNorm running statistics over the ranks; returns how many layers it averaged.

    DeepSpeed keeps each rank's buffers as that rank's batches left them (DDP would broadcast rank 0's
    before every forward), so without this every rank would validate a slightly different model and
    the checkpoint (rank 0's buffers) would be a third one. timm's ``distribute_bn(reduce=True)`` after
    each epoch, in one all-reduce: validation, the refit and the checkpoint then see the same model."""
    layers = [m for m in model.modules()
              if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
              and m.running_mean is not None]
    if world_size() == 1 or not layers:
        return 0
    stats = [t for m in layers for t in (m.running_mean, m.running_var)]
    flat = all_reduce_sum(torch.cat([t.detach().float().cpu().reshape(-1) for t in stats])) / world_size()
    with torch.no_grad():
        for t, part in zip(stats, flat.split([t.numel() for t in stats])):
            t.copy_(part.view_as(t))
    return len(layers)
