"""Run the refseg CLI in this process and crash it after optimizer step STEP of the training engine.

    python tests/crash_at_step.py 18 train --config configs/debug.yaml --local ...

For ``--local`` runs, whose loop runs in this very process: the engine that ``refseg.train.loop`` sets up
gets a ``step`` that ends the process (``os._exit``: no clean-up, no outputs, like a killed process) with
exit status ``CRASHED`` right after its STEP-th call. The product code is unchanged.
"""

from __future__ import annotations

import os
import sys

CRASHED = 17


def crashing_after(steps: int, setup_engine):
    """``setup_engine`` whose engine ends the process after ``steps`` calls of ``engine.step``."""

    def setup(*args, **kwargs):
        engine, scheduler = setup_engine(*args, **kwargs)
        step, calls = engine.step, [0]

        def step_then_crash(*a, **kw):
            out = step(*a, **kw)
            calls[0] += 1
            if calls[0] == steps:
                sys.stdout.flush()
                os._exit(CRASHED)
            return out

        engine.step = step_then_crash
        return engine, scheduler

    return setup


if __name__ == "__main__":
    from refseg.cli import main
    from refseg.train import loop

    loop.setup_engine = crashing_after(int(sys.argv[1]), loop.setup_engine)
    sys.exit(main(sys.argv[2:]))
