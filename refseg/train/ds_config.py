"""DeepSpeed configuration and the learning-rate schedule (pure functions, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

from refseg.config import ConfigError, DeepSpeedConfig, TrainConfig


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def check_precision(precision: str, cuda: bool) -> None:
    """Raise a one-sentence error for precisions the device cannot run."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"train.precision must be bf16, fp16 or fp32, got '{precision}'")
    if precision == "fp16" and not cuda:
        raise ConfigError(
            "train.precision=fp16 needs a CUDA GPU (DeepSpeed has no fp16 on CPU); "
            "use train.precision=bf16 or fp32 on CPU"
        )


def build_deepspeed_config(train: TrainConfig, ds: DeepSpeedConfig, cuda: bool) -> dict:
    """The DeepSpeed JSON for one engine: ZeRO stage, precision, accumulation, clipping.

    ``ds.config_file`` (a DeepSpeed JSON) is merged under the generated keys' defaults and
    ``ds.extra`` is merged last, so any raw DeepSpeed key can be set from YAML.
    """
    check_precision(train.precision, cuda)
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {ds.zero_stage}")
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
    for key in ("train_batch_size",):
        config.pop(key, None)  # derived by DeepSpeed from micro batch x accumulation x world
    return _deep_merge(config, ds.extra)


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
