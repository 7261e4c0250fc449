"""Arguments several verbs share: dotted overrides, the Ray address, positive numbers, shipped configs."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from refseg.config import shipped_path


def add_overrides(p: argparse.ArgumentParser,
                  help: str = "dotted config overrides, e.g. train.lr=2e-4 model.fusion.num_layers=4") -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help=help)


def add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else a fresh local instance)")


def config_path(name: str) -> str:
    """``--config``: a YAML path, or the name of a config shipped in configs/ (e.g. 'debug')."""
    return shipped_path("configs", name, "config")


def positive(kind: type) -> Callable[[str], int | float]:
    """An argparse ``type`` that parses ``kind`` and refuses values <= 0."""
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a valid {kind.__name__}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{s} must be positive")
        return v
    return parse
