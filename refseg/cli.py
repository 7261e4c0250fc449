"""``refseg <verb>``: the command line. ``main(argv)`` takes a list so tests run it in-process."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from refseg.config import ConfigError
from refseg.data.errors import RefSegDataError

DEMO_CONFIG = "debug"


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. train.lr=2e-4 model.fusion.num_layers=4")


def _config_path(name: str) -> str:
    """A config path, or the name of a config shipped in configs/ (e.g. 'debug')."""
    p = Path(name)
    if p.is_file() or p.suffix in (".yaml", ".yml"):
        return str(p)
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = base / "configs" / f"{name}.yaml"
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(f"config '{name}' is neither a file nor a config shipped in configs/; pass a YAML path")


def cmd_train(a: argparse.Namespace) -> int:
    from refseg.config import load_config
    from refseg.train import run_training

    cfg = load_config(_config_path(a.config), a.overrides)
    out = a.output_dir or f"runs/{Path(a.config).stem}"
    summary = run_training(cfg, out, resume=a.resume, local=a.local, address=a.address)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_synth(a: argparse.Namespace) -> int:
    from refseg.data import make_synthetic

    path = make_synthetic(a.out, num_images=a.images, seed=a.seed)
    print(f"synthetic RefCOCO-format set written to {path}")
    return 0


def cmd_model_info(a: argparse.Namespace) -> int:
    from refseg.models.info import format_model_info, model_info

    print(format_model_info(model_info(a.preset)))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from refseg.demo import run_demo

    run_demo(a.output_dir, data_root=a.data_root, overrides=a.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refseg", description="Referring image segmentation on Ray + DeepSpeed")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("train", help="train with Ray Train + DeepSpeed ZeRO")
    p.add_argument("--config", required=True, help="YAML config path or a shipped name (debug, refcoco_r101)")
    p.add_argument("--output-dir", help="where summary.json, model.pt, metrics and plots go")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its latest checkpoint")
    p.add_argument("--local", action="store_true",
                   help="single process in this driver (Ray Train local mode): breakpoint() works")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a fresh local instance)")
    _add_overrides(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("synth", help="write a synthetic RefCOCO-format set (refer layout)")
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_synth)

    p = sub.add_parser("model-info", help="parameter counts per component")
    p.add_argument("--preset", default="r101")
    p.set_defaults(fn=cmd_model_info)

    p = sub.add_parser("demo", help="synthetic data -> DeepSpeed training -> evaluation -> overlays")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--data-root", default=None, help="where the synthetic set lives (default: <output-dir>/data)")
    _add_overrides(p)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("prepare", help="convert refer files or a manifest into Parquet shards")
    p.add_argument("--data-root", help="refer layout root")
    p.add_argument("--dataset", default="refcoco")
    p.add_argument("--split-by", default="unc")
    p.add_argument("--image-dir", default=None)
    p.add_argument("--manifest", default=None, help="JSONL/Parquet manifest instead of refer files")
    p.add_argument("--splits", default=None, help="comma-separated splits (default: all in the files)")
    p.add_argument("--out", required=True, help="output dir or URI (s3://, gs://)")
    p.set_defaults(fn=cmd_prepare)

    for module in _VERB_MODULES:
        try:
            mod = __import__(module, fromlist=["add_verbs"])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.add_verbs(sub)
    return parser


_VERB_MODULES = ["refseg.infer.commands", "refseg.tuning"]


def cmd_prepare(a: argparse.Namespace) -> int:
    from refseg.data.shards import prepare

    splits = a.splits.split(",") if a.splits else None
    counts = prepare(data_root=a.data_root, dataset=a.dataset, split_by=a.split_by, image_dir=a.image_dir,
                     manifest=a.manifest, splits=splits, out=a.out)
    print(json.dumps(counts, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, RefSegDataError) as e:  # bad config or data: one sentence, no traceback
        print(f"refseg: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"refseg: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
