"""Typed experiment configuration: dataclasses (the schema), YAML loading, dotted overrides.

One way config becomes objects: each section is handed to its own builder
(``build_model(cfg.model)``, ``build_dataset(cfg.data, ...)``); no module reads the whole config.

    cfg = load_config("configs/debug.yaml", ["train.lr=2e-4", "model.fusion.num_layers=4"])
    cfg.to_yaml()   # the resolved config, stored with every checkpoint and run directory

Unknown keys and wrong types raise :class:`ConfigError` naming the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-caused configuration problem; the message names the key and what to do."""


# ----------------------------------------------------------------------------- model
@dataclass
class VisionConfig:
    backbone: str = "resnet101"  # resnet101 | resnet50 | resnet34 | resnet18 | tiny
    # torchvision weights name (e.g. "IMAGENET1K_V2"), a local .pt/.pth state-dict file, or null
    weights: str | None = "IMAGENET1K_V2"
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])  # only for backbone=tiny
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1, 1])  # only for backbone=tiny
    norm: str = "frozen_bn"  # bn | frozen_bn | gn
    fpn_channels: int = 256


@dataclass
class TextConfig:
    # Hugging Face hub name or local directory for from_pretrained; ignored when bert_config is set
    encoder: str = "bert-base-uncased"
    # kwargs for transformers.BertConfig -> random init (tiny preset / tests); null = from_pretrained
    bert_config: dict | None = None
    tokenizer: str | None = None  # hub name / local dir; null = same as encoder
    lstm_hidden: int = 128  # per direction
    dim: int = 256  # output width of word and sentence features
    freeze_encoder: bool = False


@dataclass
class FusionConfig:
    num_layers: int = 3
    num_heads: int = 8
    ffn_dim: int = 1024
    dropout: float = 0.0
    level: int = 16  # stride of the FPN level the fusion runs on (8, 16 or 32)
    # LAVT-style early fusion: FiLM every backbone stage by the sentence (identity at init for a
    # pretrained backbone); the cross-attention fusion above still runs on the FPN output
    early: bool = False


@dataclass
class DecoderConfig:
    channels: list[int] = field(default_factory=lambda: [128, 64, 32, 16])
    # skip from the backbone's stride-2 stem activations into the decoder's stride-2 stage (sentence-
    # gated like the FPN skips, zero at init): the sub-pixel head then sees edges at half resolution
    stem_skip: bool = False


@dataclass
class LossConfig:
    bce_weight: float = 1.0
    dice_weight: float = 1.0


@dataclass
class ModelConfig:
    preset: str | None = None  # r101 | r50 | tiny: fills every field below it does not override
    dim: int = 256
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)


# ----------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    source: str = "refer"  # refer | parquet | manifest
    root: str = "data"  # refer layout root (refcoco/, images/mscoco/images/train2014/)
    dataset: str = "refcoco"  # refcoco | refcoco+ | refcocog
    split_by: str = "unc"  # unc | umd | google
    image_dir: str | None = None  # explicit COCO train2014 dir; null = refer's default under root
    parquet: str | None = None  # shards root (local, s3://, gs://): <parquet>/<split>/*.parquet
    manifest: str | None = None  # JSONL/Parquet manifest; may contain "{split}"
    train_split: str = "train"
    val_split: str = "val"
    synthetic: bool = False  # create a synthetic refer-format set at `root` when it is missing
    synthetic_images: int = 400
    synthetic_seed: int = 0
    image_size: int = 480
    keep_aspect: bool = False  # True: resize longer side + pad; False: plain resize (LAVT)
    max_tokens: int = 20
    augment: bool = False
    hflip_prob: float = 0.5  # only with augment; left/right words are swapped with the image
    min_scale: float = 0.85  # only with augment; zoom-out: the image shrinks by a factor in [min_scale, 1]
    shuffle_expressions: bool = False  # control run: pair every image with another ref's expression
    max_samples: int | None = None  # cap per split (quick runs)
    num_read_tasks: int | None = None  # Ray Data parallelism of the decode/transform stage
    map_cpus: float = 0.5  # CPUs reserved per Ray Data map task
    # decode every ref once into the object store; training workers then keep their shard in memory and
    # only draw, augment and tokenise per epoch: for small sets (4 B/pixel/ref; see refseg.data.cache)
    cache: bool = False


# ----------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    epochs: int = 40  # with time_budget_s: the most
    # wall seconds for the run, counted from `refseg train`'s start: after 3 timed epochs the epoch count is
    # fitted to what is left (at most `epochs`) and the LR schedule re-aimed to end there; null = off
    time_budget_s: float | None = None
    batch_size: int = 16  # per worker
    lr: float = 1e-4  # fusion / decoder / FPN / LSTM
    encoder_lr_mult: float = 0.1  # pretrained ResNet and BERT get lr * this
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    poly_power: float = 0.9
    grad_accum: int = 1
    grad_clip: float = 1.0
    precision: str = "bf16"  # bf16 | fp16 | fp32
    # torch.compile inside the DeepSpeed engine (R101 on an H200: 76-90 s once; 1.15x / 0.96x per step in two runs)
    compile: bool = False
    seed: int = 0
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    storage_path: str | None = None  # shared FS / s3:// for multi-node; null = ~/ray_results
    name: str | None = None
    max_failures: int = 0
    val_every: int = 1  # epochs; 0 disables validation; checkpoint epochs are validated too (to rank them)
    keep_checkpoints: int = 2  # best K by val oIoU (the latest is always kept too)
    checkpoint_every: int = 1  # epochs
    log_every: int = 10  # steps
    max_steps_per_epoch: int | None = None
    fail_at_step: int | None = None  # test hook: rank 1 exits at this global step, first attempt only


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2  # 0 (plain data parallel) | 1 | 2 | 3
    config_file: str | None = None  # a DeepSpeed JSON merged under the generated config
    overlap_comm: bool = False
    offload_optimizer: bool = False
    extra: dict = field(default_factory=dict)  # raw DeepSpeed keys merged last


# ----------------------------------------------------------------------------- eval / tune
@dataclass
class EvalConfig:
    batch_size: int = 16
    threshold: float = 0.5
    workers: int = 1
    at_train_res: bool = False


@dataclass
class TuneConfig:
    num_samples: int = 8
    max_concurrent: int | None = None
    metric: str = "val_oiou"
    mode: str = "max"
    scheduler: str = "asha"  # asha | none
    grace_period: int = 1
    search: str = "random"  # random | optuna
    space: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write the resolved config atomically."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_yaml())
        tmp.replace(path)


# ----------------------------------------------------------------------------- conversion
def _closest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Validate (and gently coerce int->float) ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0]) if len(errors) == 1 else ConfigError(f"config key '{key}': {value!r} has the wrong type")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return value
    return value


def _merge_into(obj: Any, data: dict, prefix: str = "") -> None:
    """Recursively set fields of dataclass ``obj`` from ``data``; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'{_closest(str(key), names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge_into(current, value, f"{full}.")
        else:
            setattr(obj, key, _check_type(value, hints[key], full))


def config_from_dict(data: dict | None) -> Config:
    """Build a :class:`Config`; ``model.preset`` (if given) seeds the model section first."""
    data = dict(data or {})
    cfg = Config()
    model = data.pop("model", None) or {}
    if not isinstance(model, dict):
        raise ConfigError(f"config section 'model' must be a mapping, got {model!r}")
    preset = model.get("preset")
    if preset is not None:
        from refseg.models.presets import preset_config

        cfg.model = preset_config(preset)
    _merge_into(cfg.model, model, "model.")
    _merge_into(cfg, data)
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=2e-4"`` -> (["train", "lr"], 2e-4). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.lr=2e-4)")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str) and _looks_float(value):
        value = float(value)  # YAML 1.1 reads "2e-4" as a string
    return key.strip().split("."), value


def _looks_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return any(c in s.lower() for c in "e.") and not s.strip().lower() in ("nan", "inf", "-inf")


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply dotted ``key=value`` overrides to a nested dict (validation happens in config_from_dict)."""
    data = _deepcopy(data)
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        node[path[-1]] = value
    return data


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def _fix_floats(d: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string; turn such strings into floats."""
    if isinstance(d, dict):
        return {k: _fix_floats(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_fix_floats(v) for v in d]
    if isinstance(d, str) and _looks_float(d):
        return float(d)
    return d


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass a path like configs/debug.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (model, data, train, ...)")
    return _fix_floats(data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or defaults when ``path`` is None) and apply dotted overrides."""
    data = load_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides))
