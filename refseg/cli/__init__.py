"""``refseg <verb>``: the command line. ``main(argv)`` takes a list so tests run it in-process.

Each verb group is a module with ``add_verbs(subparsers)``: :mod:`refseg.cli.train` (train, synth,
model-info, demo, prepare), :mod:`refseg.cli.infer` (evaluate, segment, export, export-onnx),
:mod:`refseg.cli.sweep` (tune) and :mod:`refseg.cli.serve` (serve). A verb's function gets the parsed
arguments and returns the exit status.

A user's mistake (ConfigError, RefSegDataError, FileNotFoundError) is one ``refseg: error:`` line,
exit 2. Ctrl-C (SIGINT) and SIGTERM end a verb with one line -- the verb's ``on_interrupt(args)``
sentence when it sets one, e.g. segment's "interrupted: N done, re-run the same command to
continue" -- and exit 130 / 143, with no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from refseg.cli import infer, serve, sweep, train
from refseg.config import ConfigError
from refseg.data.skips import RefSegDataError
from refseg.runtime import interrupt_exit_code, ray_connected, sigterm_raises, stop_ray


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refseg", description="Referring image segmentation on Ray + DeepSpeed")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="verb", required=True)
    for group in (train, infer, sweep, serve):
        group.add_verbs(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    connected = ray_connected()  # a caller's Ray connection (tests, a notebook) is left alone
    try:
        with sigterm_raises():
            return int(args.fn(args) or 0)
    except (ConfigError, RefSegDataError, FileNotFoundError) as e:  # a user's mistake: one sentence, no traceback
        print(f"refseg: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM raised as runtime.Terminated
        if not connected:
            stop_ray()
        on_interrupt = getattr(args, "on_interrupt", None)
        print(f"refseg: {on_interrupt(args) if on_interrupt else 'interrupted'}", file=sys.stderr)
        return interrupt_exit_code(e)
