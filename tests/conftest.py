"""Session-wide fixtures: one local Ray instance and one small synthetic refer-format set.

    def test_x(ray_session, synthetic_root): ...   # ray is initialised; synthetic_root is a Path

Ray starts once per test session (each ``ray.init`` costs seconds) with ``address="local"`` so a
stale cluster recorded by an earlier ``ray start`` is never attached to, 2 CPUs and a modest object
store; progress bars are off. Tests that need another Ray setup must not call ``ray.shutdown()``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (refer_fixtures, ...) importable
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# A shell without job control starts a background job (`make test &`, nohup ... &) with SIGINT ignored,
# and children inherit SIG_IGN: the Ctrl-C tests' subprocesses would ignore the SIGINT they are sent
# (seen 2026-12-01: six such failures in a backgrounded run, none in CI). A Python handler is reset to
# the default in a child, so with this the tests behave the same however pytest was started.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

RAY_NUM_CPUS = 2
RAY_OBJECT_STORE_BYTES = 300 * 1024**2
SYNTHETIC_IMAGES = 40


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance (2 CPUs, ~300 MB object store) shared by the whole session."""
    import ray
    import ray.data

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=RAY_NUM_CPUS, object_store_memory=RAY_OBJECT_STORE_BYTES,
                 include_dashboard=False, ignore_reinit_error=True, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": "90"}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A synthetic refcoco/unc set of 40 images (seed 0), made once per session (read-only!)."""
    from refseg.data.sources.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synthetic") / "set", num_images=SYNTHETIC_IMAGES, seed=0)


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """Every test ends with the SIGINT / SIGTERM handlers it started with, so a test (or a library it
    drives) that leaves SIGINT ignored cannot break the Ctrl-C tests after it (children inherit SIG_IGN)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)
