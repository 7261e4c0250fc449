"""The training verbs of ``refseg``: train, synth, model-info, demo, prepare (``add_verbs(subparsers)``)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from refseg.cli.args import add_address, add_overrides, config_path
from refseg.io import check_output_dir
from refseg.runtime import stop_ray

PREPARE_INTERRUPTED = ("interrupted: the shard files written are whole but the set is incomplete; re-run the same "
                       "command to write it again from the start")


def cmd_train(a: argparse.Namespace) -> int:
    from refseg.config import load_config

    cfg = load_config(config_path(a.config), a.overrides)
    out = a.output_dir or f"runs/{Path(a.config).stem}"
    check_output_dir(out, "--output-dir")
    from refseg.train import TrainingStopped, run_training  # torch, DeepSpeed, Ray: after the checks

    try:
        summary = run_training(cfg, out, resume=a.resume, local=a.local, address=a.address)
    except TrainingStopped as e:  # SIGINT / SIGTERM: the workers saved a checkpoint after their current step
        stop_ray()  # now: nothing of Ray's on the way out after the sentence
        stop = e.summary["interrupted"]
        print(f"refseg: {stopped_sentence(a, out, stop, e.summary['steps_per_epoch'])}", file=sys.stderr)
        return 128 + e.signum
    print(json.dumps(summary, indent=1))
    return 0


def stopped_sentence(a: argparse.Namespace, out: str, stop: dict, steps_per_epoch: int) -> str:
    """The line a stopped ``refseg train`` ends with: where it stopped and the command that continues it."""
    if stop["epoch_steps"]:
        where = (f"in epoch {stop['epochs_done'] + 1} after step {stop['step']} ({stop['epoch_steps']} of its "
                 f"{steps_per_epoch} steps)")
    elif not stop["step"]:
        where = "before its first step"
    else:
        where = f"after epoch {stop['epochs_done']} (step {stop['step']})"
    command = ["refseg", "train", "--config", a.config, "--output-dir", out, "--resume",
               *(["--local"] if a.local else []), *(["--address", a.address] if a.address else []), *a.overrides]
    return f"stopped by {stop['signal']} {where} and saved a checkpoint; continue with: {shlex.join(command)}"


def cmd_synth(a: argparse.Namespace) -> int:
    from refseg.data import make_generalized_synthetic, make_synthetic

    check_output_dir(a.out, "--out")
    if a.generalized:
        path = make_generalized_synthetic(a.out, num_images=a.images, seed=a.seed)
        print(f"synthetic gRefCOCO-format set (one-, multi- and no-target expressions) written to {path}")
        return 0
    path = make_synthetic(a.out, num_images=a.images, seed=a.seed)
    print(f"synthetic RefCOCO-format set written to {path}")
    return 0


def cmd_model_info(a: argparse.Namespace) -> int:
    from refseg.models.info import format_model_info, model_info

    print(format_model_info(model_info(a.preset)))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from refseg.demo import run_demo

    check_output_dir(a.output_dir, "--output-dir")
    if a.data_root:
        check_output_dir(a.data_root, "--data-root")
    run_demo(a.output_dir, data_root=a.data_root, overrides=a.overrides)
    return 0


def cmd_prepare(a: argparse.Namespace) -> int:
    from refseg.data import prepare
    from refseg.data.sources.refer import check_data_root

    check_output_dir(a.out, "--out")
    if a.manifest is None and a.data_root is not None:
        check_data_root(a.data_root, a.dataset, a.split_by, a.image_dir)
    splits = a.splits.split(",") if a.splits else None
    counts = prepare(data_root=a.data_root, dataset=a.dataset, split_by=a.split_by, image_dir=a.image_dir,
                     manifest=a.manifest, splits=splits, out=a.out)
    print(json.dumps(counts, indent=1))
    return 0


def add_verbs(sub: argparse._SubParsersAction) -> None:
    """Add ``train``, ``synth``, ``model-info``, ``demo`` and ``prepare`` to the ``refseg`` parser."""
    p = sub.add_parser("train", help="train with Ray Train + DeepSpeed ZeRO")
    p.add_argument("--config", required=True, help="YAML config path or a shipped name (debug, refcoco_r101)")
    p.add_argument("--output-dir", help="where summary.json, model.pt, metrics and plots go")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its latest checkpoint")
    p.add_argument("--local", action="store_true",
                   help="single process in this driver (Ray Train local mode): breakpoint() works")
    add_address(p)
    add_overrides(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("synth", help="write a synthetic RefCOCO-format set (refer layout; --generalized: gRefCOCO)")
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generalized", action="store_true",
                   help="the gRefCOCO layout: expressions naming one shape, several, or none")
    p.set_defaults(fn=cmd_synth)

    p = sub.add_parser("model-info", help="parameter counts per component")
    p.add_argument("--preset", default="r101")
    p.set_defaults(fn=cmd_model_info)

    p = sub.add_parser("demo", help="synthetic data -> DeepSpeed training -> evaluation -> overlays")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--data-root", default=None, help="where the synthetic set lives (default: <output-dir>/data)")
    add_overrides(p)
    p.set_defaults(fn=cmd_demo, on_interrupt=lambda a: "interrupted: re-run the same command to continue (training "
                                                       "resumes from its last checkpoint)")

    p = sub.add_parser("prepare", help="convert refer files or a manifest into Parquet shards")
    p.add_argument("--data-root", help="refer layout root")
    p.add_argument("--dataset", default="refcoco")
    p.add_argument("--split-by", default="unc")
    p.add_argument("--image-dir", default=None)
    p.add_argument("--manifest", default=None, help="JSONL/Parquet manifest instead of refer files")
    p.add_argument("--splits", default=None, help="comma-separated splits (default: all in the files)")
    p.add_argument("--out", required=True, help="output dir or URI (s3://, gs://)")
    p.set_defaults(fn=cmd_prepare, on_interrupt=lambda a: PREPARE_INTERRUPTED)
