"""Every value and cross-field check of the configuration, as one :class:`ConfigError` sentence each.

    validate(cfg)            # the training driver, before any Ray work: model, data, train, deepspeed
    validate_sweep(cfg)      # a sweep, before Ray starts: the tune section (and its needs from train)
    validate_data(cfg.data)  # build_dataset / count_refs / load_refs; validate_model: build_model

Each function reads only its section, so the builders of a section refuse bad values for Python API
users too. Checks that need the environment stay with their code: the Hugging Face hub / cache
(``models.text.check_text_sources``), torchvision weight names and backbone layouts
(``models.refseg_model.check_architecture``), files (``deepspeed.config_file``), the cluster's
resources (``train.driver.check_resources``), the trackers' packages (``train.tracking.check_trackers``).
Pure: imports only the schema and the standard library.
"""

from __future__ import annotations

import math

from refseg.config.schema import (
    CLASSIC_ONLY_METRICS,
    GENERALIZED_DATASETS,
    GENERALIZED_ONLY_METRICS,
    Config,
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    ModelConfig,
    TrainConfig,
    selection_metric,
)

FUSION_LEVELS = (4, 8, 16, 32)
PRECISIONS = ("bf16", "fp16", "fp32")
SOURCES = ("refer", "parquet", "manifest")
TRACKERS = ("mlflow", "tensorboard", "wandb")


def validate(cfg: Config) -> None:
    """Raise ConfigError for the first value of ``cfg`` that training could not run with."""
    validate_train(cfg.train)
    validate_model(cfg.model)
    validate_deepspeed(cfg.deepspeed)
    validate_data(cfg.data)
    validate_refit(cfg)


def validate_refit(cfg: Config) -> None:
    """train.no_target_refit_epochs / _samples against the model and the precision."""
    t = cfg.train
    if t.no_target_refit_epochs < 0:
        raise ConfigError(f"train.no_target_refit_epochs must be 0 (off) or more passes, got {t.no_target_refit_epochs}")
    if t.no_target_refit_samples < 10:
        raise ConfigError(f"train.no_target_refit_samples must be at least 10, got {t.no_target_refit_samples}")
    if not t.no_target_refit_epochs:
        return
    if not cfg.model.no_target_head:
        raise ConfigError("train.no_target_refit_epochs refits the no-target head, and this model has none: set "
                          "model.no_target_head: true (generalized data) or train.no_target_refit_epochs: 0")
    if t.precision == "fp16" and cfg.deepspeed.zero_stage == 0:
        raise ConfigError("train.no_target_refit_epochs with train.precision=fp16 needs deepspeed.zero_stage 1, 2 "
                          "or 3 (the refit writes the fp32 master weights, which ZeRO-0's fp16 optimizer keeps "
                          "out of reach); or use bf16")


def validate_precision(precision: str, cuda: bool) -> None:
    """``train.precision`` must be known and runnable: fp16 only on a CUDA device (``cuda``)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be bf16, fp16 or fp32, got '{precision}'")
    if precision == "fp16" and not cuda:
        raise ConfigError(
            "train.precision=fp16 needs a CUDA GPU (DeepSpeed has no fp16 on CPU); "
            "use train.precision=bf16 or fp32 on CPU"
        )


def validate_train(train: TrainConfig) -> None:
    """train.precision (against train.use_gpu), train.epochs, train.time_budget_s, train.init_from,
    train.cpu_keep_freed_mb and train.tracking."""
    validate_precision(train.precision, cuda=train.use_gpu)
    if train.epochs < 1:
        raise ConfigError(f"train.epochs must be at least 1, got {train.epochs}")
    budget = train.time_budget_s
    if budget is not None and not (budget > 0 and math.isfinite(budget)):
        raise ConfigError(f"train.time_budget_s must be a positive number of seconds (or null for no budget), "
                          f"got {budget}")
    if train.init_from is not None and (not train.init_from.strip() or "://" in train.init_from):
        raise ConfigError(f"train.init_from must be a local model.pt, run dir or artifact folder (or null), "
                          f"got {train.init_from!r}")
    if train.cpu_keep_freed_mb < 0:
        raise ConfigError(f"train.cpu_keep_freed_mb must be 0 (glibc's default) or a number of MB, "
                          f"got {train.cpu_keep_freed_mb}")
    validate_tracking(train.tracking)
    validate_workers(train)


def validate_tracking(tracking: list[str]) -> None:
    """train.tracking: known trackers, each named once."""
    for name in tracking:
        if name not in TRACKERS:
            raise ConfigError(f"train.tracking: '{name}' is not one of mlflow | tensorboard | wandb")
    if len(set(tracking)) != len(tracking):
        raise ConfigError(f"train.tracking lists a tracker twice: {tracking}")


def validate_workers(train: TrainConfig) -> None:
    """train.num_workers: a count of at least 1, or [min, max] with 1 <= min <= max (elastic)."""
    n = train.num_workers
    if isinstance(n, int) and n < 1 or isinstance(n, list) and (len(n) != 2 or not 1 <= n[0] <= n[1]):
        raise ConfigError(f"train.num_workers must be a count of at least 1 or [min, max] with 1 <= min <= max "
                          f"(elastic training), got {n}")
    if not train.elastic_resize_monitor_interval_s >= 0:
        raise ConfigError(f"train.elastic_resize_monitor_interval_s must be 0 or more seconds, "
                          f"got {train.elastic_resize_monitor_interval_s}")


def validate_deepspeed(ds: DeepSpeedConfig) -> None:
    """deepspeed.zero_stage must be a ZeRO stage."""
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {ds.zero_stage}")


def validate_model(model: ModelConfig) -> None:
    """The layout arithmetic of ``model``: fusion.level, model.dim vs fusion.num_heads, the decoder stages."""
    f, d = model.fusion, model.decoder
    if f.level not in FUSION_LEVELS:
        raise ConfigError(f"model: fusion.level must be one of 4, 8, 16, 32, got {f.level}.")
    if f.num_layers >= 1 and f.num_heads < 1:
        raise ConfigError(f"model: fusion.num_heads must be at least 1, got {f.num_heads}.")
    if f.num_layers >= 1 and model.dim % f.num_heads:
        raise ConfigError(f"model: model.dim={model.dim} must be divisible by fusion.num_heads={f.num_heads}.")
    if not d.channels:
        raise ConfigError("model: decoder.channels needs at least one entry.")
    if not 0.0 < model.no_target_threshold < 1.0:
        raise ConfigError(f"model: no_target_threshold must lie strictly between 0 and 1 (a probability), "
                          f"got {model.no_target_threshold}.")
    if not model.loss.no_target_weight >= 0.0:
        raise ConfigError(f"model: loss.no_target_weight must be 0 or more, got {model.loss.no_target_weight}.")
    if not model.loss.no_target_pos_weight > 0.0:
        raise ConfigError(f"model: loss.no_target_pos_weight must be more than 0, got {model.loss.no_target_pos_weight}.")
    if not model.loss.empty_mask_weight >= 0.0:
        raise ConfigError(f"model: loss.empty_mask_weight must be 0 or more, got {model.loss.empty_mask_weight}.")
    strides = [f.level / 2 ** (i + 1) for i in range(len(d.channels))]  # each decoder stage upsamples 2x
    if strides[-1] < 1:  # finer than the input: the map is only resized back down
        keep = int(math.log2(f.level))  # stages from stride `level` down to 1
        raise ConfigError(
            f"model: with fusion.level={f.level} the {len(d.channels)} decoder.channels end at stride {strides[-1]:g} "
            f"(logits at {1 / strides[-1]:g}x the input size, resized back down: the finest stages' work is wasted); "
            f"give at most {keep}, e.g. decoder.channels={list(d.channels)[-keep:]}.")
    if d.stem_skip and 2.0 not in strides[:-1]:
        raise ConfigError(
            f"model: decoder.stem_skip needs a decoder stage at stride 2 before the last one; with fusion.level="
            f"{f.level} and {len(d.channels)} decoder.channels the stages sit at strides "
            f"{[int(s) if s.is_integer() else s for s in strides]}: add a channel or set stem_skip=false.")


def validate_data(data: DataConfig) -> None:
    """data.source and the path it needs, data.min_scale, data.hflip_prob, data.map_batch_rows, grefcoco's split_by."""
    if data.source not in SOURCES:
        raise ConfigError(f"data.source '{data.source}' is not one of refer | parquet | manifest")
    if data.source == "parquet" and not data.parquet:
        raise ConfigError("data.source is 'parquet' but data.parquet is not set; give the shards root")
    if data.source == "manifest" and not data.manifest:
        raise ConfigError("data.source is 'manifest' but data.manifest is not set; give its path")
    if not 0.0 < data.min_scale <= 1.0:
        raise ConfigError(f"data.min_scale must lie in (0, 1] (the zoom-out draws a scale in [min_scale, 1]), "
                          f"got {data.min_scale}; 1 turns the zoom-out off")
    if not 0.0 <= data.hflip_prob <= 1.0:
        raise ConfigError(f"data.hflip_prob must lie in [0, 1], got {data.hflip_prob}")
    if data.map_batch_rows is not None and data.map_batch_rows < 1:
        raise ConfigError(f"data.map_batch_rows must be at least 1 ref per map task, got {data.map_batch_rows}; "
                          "leave it unset (null) to size the tasks by their decoded output")
    if data.dataset == "grefcoco" and data.split_by != "unc":
        raise ConfigError(f"data.dataset=grefcoco is split by 'unc' only, got data.split_by={data.split_by!r}")


def validate_sweep(cfg: Config) -> None:
    """The ``tune.*`` settings a sweep cannot run, a metric that needs validation epochs, and
    ``train.tracking`` (the sweep's logger callbacks use it before any trial runs)."""
    validate_tracking(cfg.train.tracking)
    t = cfg.tune
    if t.mode not in ("max", "min"):
        raise ConfigError(f"tune.mode must be 'max' or 'min', got {t.mode!r}")
    if t.scheduler not in ("asha", "none"):
        raise ConfigError(f"tune.scheduler must be 'asha' or 'none', got {t.scheduler!r}")
    if t.search not in ("random", "optuna"):
        raise ConfigError(f"tune.search must be 'random' or 'optuna', got {t.search!r}")
    if t.grace_period < 1:
        raise ConfigError(f"tune.grace_period must be at least 1 epoch, got {t.grace_period}")
    if not isinstance(cfg.train.num_workers, int):
        raise ConfigError(f"train.num_workers={cfg.train.num_workers}: a sweep's trials need a fixed worker count "
                          "(each trial holds its resources for its life); set one number")
    metric = cfg.tune_metric()
    generalized = cfg.data.dataset in GENERALIZED_DATASETS
    if metric in (CLASSIC_ONLY_METRICS if generalized else GENERALIZED_ONLY_METRICS):
        valid = GENERALIZED_ONLY_METRICS if generalized else CLASSIC_ONLY_METRICS
        raise ConfigError(f"tune.metric={metric} is not reported on data.dataset={cfg.data.dataset}; use one of "
                          f"{', '.join(valid)} (or leave tune.metric unset for {selection_metric(cfg.data.dataset)})")
    if metric.startswith("val_") and cfg.train.val_every < 1:
        raise ConfigError(f"tune.metric={metric} needs validation: set train.val_every to 1 (or more)")
