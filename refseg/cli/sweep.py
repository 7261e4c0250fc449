"""The sweep verb of ``refseg``: tune (``add_verbs(subparsers)``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from refseg.cli.args import add_address, add_overrides, config_path
from refseg.config import ConfigError, apply_overrides, load_yaml, shipped_path
from refseg.io import check_output_dir


def cmd_tune(a: argparse.Namespace) -> int:
    from refseg.data.sources.refer import check_data_root
    from refseg.sweep import read_space, resume_sweep, run_sweep, trial_config

    if a.resume:
        if a.config or a.space or a.overrides or a.num_samples is not None or a.max_concurrent is not None:
            raise ConfigError("--resume continues the sweep exactly as it started (its sweep.json); "
                              "drop --config, --space, --num-samples, --max-concurrent and overrides")
        summary = resume_sweep(a.resume, address=a.address)
    else:
        if not a.config:
            raise ConfigError("refseg tune needs --config CFG (or --resume DIR)")
        base = apply_overrides(load_yaml(config_path(a.config)), a.overrides)
        space = a.space or trial_config(base, {}).tune.space
        if not space:
            raise ConfigError("no search space: pass --space tune/<name>.yaml or set tune.space in the config")
        path = shipped_path("tune", space, "search space")
        out = a.output_dir = a.output_dir or f"runs/tune-{Path(a.config).stem}-{Path(path).stem}"
        check_output_dir(out, "--output-dir")
        data = trial_config(base, {}).data
        if data.source == "refer" and not data.synthetic:
            check_data_root(data.root, data.dataset, data.split_by, data.image_dir)
        summary = run_sweep(base, read_space(path), out, num_samples=a.num_samples,
                            max_concurrent=a.max_concurrent, address=a.address, space_name=f"'{path}'")
    print(json.dumps(summary, indent=1))
    statuses = summary["statuses"]
    if statuses.get("interrupted") or statuses.get("pending"):
        print(f"refseg: {tune_interrupted(a)}", file=sys.stderr)
        return 130
    return 1 if statuses and set(statuses) == {"error"} else 0


def tune_interrupted(a: argparse.Namespace) -> str:
    """Tune's interrupt line: the --resume command once the sweep has started (its sweep.json exists)."""
    from refseg.sweep.outputs import SWEEP_FILE

    where = a.resume or a.output_dir  # cmd_tune fills in the default --output-dir
    if not where or not (Path(where).expanduser() / SWEEP_FILE).is_file():
        return "interrupted before the sweep started; nothing to resume"
    return f"sweep interrupted; continue it with: refseg tune --resume {Path(where).expanduser().resolve()}"


def add_verbs(sub: argparse._SubParsersAction) -> None:
    """Add ``tune`` to the ``refseg`` parser."""
    p = sub.add_parser("tune", help="hyperparameter sweep: one Ray Train + DeepSpeed run per Tune trial (ASHA)",
                       epilog="outputs in DIR: trials.csv, best.yaml, summary.json, trials.png, trials/<id>/")
    p.add_argument("--config", help="YAML config path or a shipped name (debug, refcoco_r101)")
    p.add_argument("--space", help="search space YAML (tune/fusion_lr.yaml or its name); default tune.space")
    p.add_argument("--num-samples", type=int, help="trials to run (default tune.num_samples)")
    p.add_argument("--max-concurrent", type=int,
                   help="trials at once (default: as many as the cluster's CPUs/GPUs fit without starving data)")
    p.add_argument("--output-dir", help="sweep directory (default runs/tune-<config>-<space>)")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted sweep in DIR")
    add_address(p)
    add_overrides(p, help="dotted config overrides for every trial")
    p.set_defaults(fn=cmd_tune, on_interrupt=tune_interrupted)
