"""refseg.config.validate: one bad value per check -> its one sentence; good configs pass."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from refseg.config import Config, ConfigError, load_config
from refseg.config.validate import (
    validate,
    validate_data,
    validate_deepspeed,
    validate_model,
    validate_precision,
    validate_sweep,
    validate_train,
)

REPO = Path(__file__).resolve().parents[1]


def with_values(**dotted) -> Config:
    """A default Config with ``section__key=value`` (``__`` for dots) set, no type checks."""
    cfg = Config()
    for key, value in dotted.items():
        *path, last = key.split("__")
        node = cfg
        for part in path:
            node = getattr(node, part)
        setattr(node, last, value)
    return cfg


CASES = [  # (values, the sentence validate(cfg) raises, exactly)
    ({"train__precision": "fp64"}, "train.precision must be bf16, fp16 or fp32, got 'fp64'"),
    ({"train__precision": "fp16"}, ("train.precision=fp16 needs a CUDA GPU (DeepSpeed has no fp16 on CPU); "
                                   "use train.precision=bf16 or fp32 on CPU")),
    ({"train__epochs": 0}, "train.epochs must be at least 1, got 0"),
    ({"train__time_budget_s": 0.0}, ("train.time_budget_s must be a positive number of seconds (or null for no "
                                    "budget), got 0.0")),
    ({"train__time_budget_s": float("inf")}, ("train.time_budget_s must be a positive number of seconds (or null "
                                             "for no budget), got inf")),
    ({"deepspeed__zero_stage": 4}, "deepspeed.zero_stage must be 0, 1, 2 or 3, got 4"),
    ({"train__cpu_keep_freed_mb": -1}, "train.cpu_keep_freed_mb must be 0 (glibc's default) or a number of MB, got -1"),
    ({"model__fusion__level": 12}, "model: fusion.level must be one of 4, 8, 16, 32, got 12."),
    ({"model__loss__empty_mask_weight": -0.5}, "model: loss.empty_mask_weight must be 0 or more, got -0.5."),
    ({"model__loss__no_target_pos_weight": 0.0}, "model: loss.no_target_pos_weight must be more than 0, got 0.0."),
    ({"model__fusion__num_heads": 0}, "model: fusion.num_heads must be at least 1, got 0."),
    ({"model__dim": 64, "model__fusion__num_heads": 3}, "model: model.dim=64 must be divisible by fusion.num_heads=3."),
    ({"model__decoder__channels": []}, "model: decoder.channels needs at least one entry."),
    ({"model__fusion__level": 32, "model__decoder__stem_skip": True},
     ("model: decoder.stem_skip needs a decoder stage at stride 2 before the last one; with fusion.level=32 and 4 "
     "decoder.channels the stages sit at strides [16, 8, 4, 2]: add a channel or set stem_skip=false.")),
    ({"model__fusion__level": 8, "model__decoder__channels": [32, 16], "model__decoder__stem_skip": True},
     ("model: decoder.stem_skip needs a decoder stage at stride 2 before the last one; with fusion.level=8 and 2 "
     "decoder.channels the stages sit at strides [4, 2]: add a channel or set stem_skip=false.")),
    ({"model__fusion__level": 8},
     ("model: with fusion.level=8 the 4 decoder.channels end at stride 0.5 (logits at 2x the input size, resized "
      "back down: the finest stages' work is wasted); give at most 3, e.g. decoder.channels=[64, 32, 16].")),
    ({"data__source": "hdf5"}, "data.source 'hdf5' is not one of refer | parquet | manifest"),
    ({"data__source": "parquet"}, "data.source is 'parquet' but data.parquet is not set; give the shards root"),
    ({"data__source": "manifest"}, "data.source is 'manifest' but data.manifest is not set; give its path"),
    ({"data__min_scale": 0.0}, ("data.min_scale must lie in (0, 1] (the zoom-out draws a scale in [min_scale, 1]), "
                               "got 0.0; 1 turns the zoom-out off")),
    ({"data__min_scale": 1.5}, ("data.min_scale must lie in (0, 1] (the zoom-out draws a scale in [min_scale, 1]), "
                               "got 1.5; 1 turns the zoom-out off")),
    ({"data__hflip_prob": -0.1}, "data.hflip_prob must lie in [0, 1], got -0.1"),
    ({"data__hflip_prob": 1.5}, "data.hflip_prob must lie in [0, 1], got 1.5"),
]

SWEEP_CASES = [
    ({"tune__mode": "maximum"}, "tune.mode must be 'max' or 'min', got 'maximum'"),
    ({"tune__scheduler": "pbt"}, "tune.scheduler must be 'asha' or 'none', got 'pbt'"),
    ({"tune__search": "grid"}, "tune.search must be 'random' or 'optuna', got 'grid'"),
    ({"tune__grace_period": 0}, "tune.grace_period must be at least 1 epoch, got 0"),
    ({"train__val_every": 0}, "tune.metric=val_oiou needs validation: set train.val_every to 1 (or more)"),
    ({"data__dataset": "grefcoco", "train__val_every": 0},
     "tune.metric=val_ciou needs validation: set train.val_every to 1 (or more)"),
    ({"data__dataset": "grefcoco", "tune__metric": "val_oiou"},
     ("tune.metric=val_oiou is not reported on data.dataset=grefcoco; use one of val_giou, val_ciou, val_n_acc, "
     "val_t_acc (or leave tune.metric unset for val_ciou)")),
    ({"tune__metric": "val_giou"},
     ("tune.metric=val_giou is not reported on data.dataset=refcoco; use one of val_oiou, val_miou, val_dice "
     "(or leave tune.metric unset for val_oiou)")),
]


@pytest.mark.parametrize(("values", "sentence"), CASES, ids=["+".join(v) for v, _ in CASES])
def test_each_bad_value_is_one_sentence(values, sentence):
    with pytest.raises(ConfigError, match=f"^{re.escape(sentence)}$"):
        validate(with_values(**values))


@pytest.mark.parametrize(("values", "sentence"), SWEEP_CASES, ids=["+".join(v) for v, _ in SWEEP_CASES])
def test_each_bad_tune_value_is_one_sentence(values, sentence):
    cfg = with_values(**values)
    with pytest.raises(ConfigError, match=f"^{re.escape(sentence)}$"):
        validate_sweep(cfg)
    if "tune__mode" in values:
        validate(cfg)  # the tune section is the sweep's: training runs never read it


def test_section_functions_check_their_section_only():
    cfg = with_values(model__fusion__level=12, data__min_scale=0.0, train__epochs=0, deepspeed__zero_stage=9)
    for check, section, key in [(validate_model, cfg.model, "fusion.level"), (validate_data, cfg.data, "min_scale"),
                                (validate_train, cfg.train, "train.epochs"),
                                (validate_deepspeed, cfg.deepspeed, "zero_stage")]:
        with pytest.raises(ConfigError, match=key):
            check(section)
    validate_data(Config().data)  # and pass on the defaults
    validate_model(Config().model)


def test_fp16_is_checked_against_the_device():
    validate_precision("fp16", cuda=True)
    validate(with_values(train__precision="fp16", train__use_gpu=True))
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        validate_precision("fp16", cuda=False)


def test_good_configs_pass():
    validate(Config())
    validate_sweep(Config())
    validate(with_values(train__time_budget_s=None, model__fusion__num_layers=0, model__fusion__num_heads=3,
                         model__dim=64, data__min_scale=1.0, data__hflip_prob=0.0))
    validate(with_values(model__fusion__level=8, model__decoder__channels=[64, 32, 16], model__decoder__stem_skip=True,
                         data__source="parquet", data__parquet="shards/"))
    validate_sweep(with_values(tune__metric="loss", tune__mode="min", train__val_every=0))
    shipped = sorted((REPO / "configs").glob("*.yaml"))
    assert len(shipped) >= 3
    for path in shipped:
        cfg = load_config(path)
        validate(cfg)
        validate_sweep(cfg)


def test_validate_imports_only_the_schema_and_the_standard_library():
    tree = ast.parse((REPO / "refseg" / "config" / "validate.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in modules if m.startswith("refseg")} == {"refseg.config.schema"}
    assert all(m.split(".")[0] in ("__future__", "math", "refseg") for m in modules)
