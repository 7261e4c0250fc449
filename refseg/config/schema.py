"""The experiment configuration schema: one typed dataclass per section, and :class:`ConfigError`.

``Config`` holds the sections ``model``, ``data``, ``train``, ``deepspeed``, ``eval`` and ``tune``; each
section goes to its own builder (``build_model(cfg.model)``, ``build_dataset(cfg.data, ...)``), so no
module reads the whole config. Loading YAML and dotted overrides lives in :mod:`refseg.config.load`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

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
    no_target_weight: float = 1.0  # BCE on the no-target label; used with model.no_target_head only
    # BCE of the mask logits of no-target samples toward an all-empty mask (ReLA trains every mask, empty
    # ones included); 0: the mask loss sees target samples only. Used with model.no_target_head only
    empty_mask_weight: float = 0.0
    # weight of the no-target (positive) samples in that BCE (torch's pos_weight): > 1 evens out a set
    # where they are the minority (gRefCOCO's synthetic set: ~1 in 5)
    no_target_pos_weight: float = 1.0


@dataclass
class ModelConfig:
    preset: str | None = None  # r101 | r50 | tiny: fills every field below it does not override
    dim: int = 256
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # generalized data (gRefCOCO): a head on the pooled fused tokens + sentence gives one no-target logit;
    # a sample is empty (mask cleared) when sigmoid(logit) > no_target_threshold. false: the classic model
    no_target_head: bool = False
    no_target_threshold: float = 0.5
    # true: the head reads its inputs detached (a probe): its BCE trains the head only, and
    # loss.no_target_pos_weight moves the head's decision without pulling the masks toward empty
    no_target_detach: bool = False
    # true: the head also reads the vision encoder's stride-4 / stride-8 maps averaged under the predicted
    # mask, matched with the sentence: it checks the object the mask found, not only the wording
    no_target_region: bool = False


# ----------------------------------------------------------------------------- data
# data.dataset values of generalized data (one-, multi- and no-target expressions): validation reports
# the GRES metrics (refseg.metrics.GresMetrics) and the best checkpoint is the one with the best val cIoU
GENERALIZED_DATASETS = ("grefcoco",)
CLASSIC_ONLY_METRICS = ("val_oiou", "val_miou", "val_dice")  # reported on classic data only
GENERALIZED_ONLY_METRICS = ("val_giou", "val_ciou", "val_n_acc", "val_t_acc")  # on generalized data only


def selection_metric(dataset: str) -> str:
    """The validation metric that ranks a run's checkpoints and, unless ``tune.metric`` names another, a
    sweep's trials: ``val_ciou`` on generalized data (``dataset`` in GENERALIZED_DATASETS), else ``val_oiou``."""
    return "val_ciou" if dataset in GENERALIZED_DATASETS else "val_oiou"


@dataclass
class DataConfig:
    source: str = "refer"  # refer | parquet | manifest
    root: str = "data"  # refer layout root (refcoco/, images/mscoco/images/train2014/)
    dataset: str = "refcoco"  # refcoco | refcoco+ | refcocog | grefcoco (root/grefcoco/grefs(unc).json)
    split_by: str = "unc"  # unc | umd | google (grefcoco: unc)
    image_dir: str | None = None  # explicit COCO train2014 dir; null = refer's default under root
    parquet: str | None = None  # shards root (local, s3://, gs://): <parquet>/<split>/*.parquet
    manifest: str | None = None  # JSONL/Parquet manifest; may contain "{split}"
    train_split: str = "train"
    val_split: str = "val"
    synthetic: bool = False  # create a synthetic set at `root` when missing (grefcoco: the generalized one)
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
    # refs per Ray Data map task; null = sized by the decoded output (~96 MB, 8-256 refs; README "Data")
    map_batch_rows: int | None = None
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
    # after the last epoch's steps, refit the no-target head (all but its token conv) on the final model's
    # eval-mode features of up to no_target_refit_samples training samples: at most this many passes, the
    # pass with the best held-out BCE kept (refseg/train/refit.py); 0 = off. Needs model.no_target_head
    no_target_refit_epochs: int = 0
    no_target_refit_samples: int = 8192  # over all workers
    grad_accum: int = 1
    grad_clip: float = 1.0
    precision: str = "bf16"  # bf16 | fp16 | fp32
    # torch.compile inside the DeepSpeed engine (compiles once at the first step; BENCHMARKS.md, GPU)
    compile: bool = False
    seed: int = 0
    # Ray Train workers: a count, or [min, max] for elastic training (the group shrinks when nodes are lost
    # and grows back when they return, from the latest checkpoint; docs/cluster.md). The global batch is
    # batch_size x max x grad_accum at any size: with fewer workers the accumulation grows.
    num_workers: int | list[int] = 2
    elastic_resize_monitor_interval_s: float = 60.0  # elastic: how often Ray Train looks for room to grow
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # CPU workers: MB of freed memory glibc keeps for reuse instead of fresh zeroed pages for every large
    # tensor (refseg.runtime.keep_freed_memory; x0.83-0.89 per debug step, BENCHMARKS.md "CPU step"); 0 = glibc's default
    cpu_keep_freed_mb: int = 256
    gpus_per_worker: float = 1.0
    storage_path: str | None = None  # shared FS / s3:// for multi-node; null = ~/ray_results
    name: str | None = None
    max_failures: int = 0
    val_every: int = 1  # epochs; 0 disables validation; checkpoint epochs are validated too (to rank them)
    keep_checkpoints: int = 2  # best K by val oIoU (the latest is always kept too)
    checkpoint_every: int = 1  # epochs
    log_every: int = 10  # steps
    max_steps_per_epoch: int | None = None
    # a new run starts from these weights: a model.pt, a run dir or an artifact folder (`refseg export`)
    init_from: str | None = None
    init_strict: bool = True  # false: load the tensors that fit, print one line naming the rest
    # experiment trackers fed from rank 0 (README "Tracking"): any of mlflow | tensorboard | wandb
    tracking: list[str] = field(default_factory=list)
    # MLflow tracking URI (http(s)://, sqlite:///, databricks); null = a SQLite store in <output_dir>/mlflow
    tracking_uri: str | None = None

    def worker_range(self) -> tuple[int, int]:
        """(min, max) Ray Train workers: ``num_workers`` twice for a fixed count."""
        n = self.num_workers
        return (n, n) if isinstance(n, int) else (n[0], n[-1])


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
    batch_size: int = 16  # per worker, for the validation passes during training


@dataclass
class TuneConfig:
    num_samples: int = 8
    max_concurrent: int | None = None
    metric: str | None = None  # null: the checkpoint metric (val_oiou; val_ciou on generalized data)
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

    def tune_metric(self) -> str:
        """The metric a sweep ranks trials on: ``tune.metric``, or when unset the run's checkpoint metric
        (:func:`selection_metric` of ``data.dataset``)."""
        return self.tune.metric or selection_metric(self.data.dataset)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
