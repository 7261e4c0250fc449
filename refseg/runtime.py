"""Ray start-up shared by training, batch inference and sweeps, a quiet console by default, and SIGTERM.

    with sigterm_raises():   # SIGTERM raises Terminated (a KeyboardInterrupt) like Ctrl-C does
    init_ray(address)        # attach to ``address`` / $RAY_ADDRESS, else start a fresh local instance
    local_env()              # a one-rank process group's env vars (Ray Train local mode)
    actor_options(workers)   # resources per inference actor
    keep_freed_memory(256)   # CPU training: glibc reuses freed tensor memory instead of fresh pages

Ray's defaults on a terminal: its start-up lines (the token-authentication notice, "Started a local
Ray instance"), Ray Data's execution plan and progress for every dataset, Ray Train's INFO record of
every ``report`` call, and -- on a local instance started without the dashboard -- a warning from
Train's placement-group cleaner every few seconds that the State API is unavailable. They are off
unless ``refseg -v``; the figures that matter are in refseg's lines and in metrics.jsonl. Warnings a
user must act on (token authentication *disabled*, Ray's own errors) stay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator

from refseg.config import ConfigError

QUIET_ENV = "REFSEG_QUIET"  # set (to "1") in the runtime_env of local instances unless verbose
_NOISY_LOGGERS = (  # set to ERROR unless verbose
    "ray.train.v2._internal.execution.controller.placement_group_cleaner",
    "ray.data._internal.progress",  # "Progress bars disabled. To enable, ..." and the like
    "torch.utils.cpp_extension",  # "No CUDA runtime is found" while DeepSpeed builds its CPU op
)


def verbose() -> bool:
    """True when the ``refseg`` logger shows INFO (``refseg -v``, or a caller's logging setup)."""
    return logging.getLogger("refseg").isEnabledFor(logging.INFO)


def setup_worker() -> None:
    """Ray ``worker_process_setup_hook`` of the local instances :func:`init_ray` starts.

    Sets $RAY_ADDRESS to this instance's GCS, so Ray Train's placement-group cleaner (which calls the
    State API with no address) finds it even when another Ray instance runs on the host (it would
    die with "Found multiple active Ray instances"). Unless verbose ($REFSEG_QUIET=1), silences the
    cleaner's State-API polling warning (without the dashboard it cannot ask whether the controller
    lives), Ray Data's progress notices, Ray Train's record of every report (logged under its file
    path, outside LoggingConfig's reach), and deprecation warnings about calls inside DeepSpeed (a
    torch collective) and Ray Train (``exclude_resources``)."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    if os.environ.get(QUIET_ENV) != "1":
        return
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: only the noise stays
        pass
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*ExecutionOptions.exclude_resources.*")  # Ray Train's own call


def worker_env() -> dict[str, str]:
    """env_vars for a local instance's runtime_env: :func:`setup_worker` quiets, and Ray Data logs
    warnings only (not "Starting execution of Dataset ...", its plan and "execution finished" for
    every dataset every epoch; Ray Data (re)configures its loggers on import, so a level set in the
    setup hook would not hold)."""
    return {} if verbose() else {QUIET_ENV: "1", "RAY_DATA_LOG_LEVEL": "WARNING"}


def quiet_data() -> None:
    """No Ray Data progress bars, execution plans or per-dataset INFO lines in this process (unless
    verbose); workers get the same through :func:`worker_env`."""
    if verbose():
        return
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # after ``import ray.data`` configured it
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def train_log_level() -> str:
    """Ray Train's own console level: INFO shows a line for every ``report`` of every worker."""
    return "INFO" if verbose() else "WARNING"


def extensions_env() -> dict[str, str]:
    """{TORCH_EXTENSIONS_DIR: <venv>/torch_extensions} unless the user set it or the venv is read-only.

    DeepSpeed JIT-builds its CPU communication op there on first use (1-2 min); the default
    ~/.cache/torch_extensions is shared by every venv, so two venvs (another checkout, CI) rebuild it
    back and forth and a run pays the build inside its wall time."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return {"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}
    path = os.path.join(sys.prefix, "torch_extensions")
    return {"TORCH_EXTENSIONS_DIR": path} if os.access(sys.prefix, os.W_OK) else {}


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a spot node's notice), raised in the main thread the way Ctrl-C raises
    KeyboardInterrupt, so both unwind the same way (``refseg`` exits 128 + the signal number)."""


_SIGTERM_SEEN = {"seen": False}  # Ray / Tune code on the way up may re-raise a plain KeyboardInterrupt


def _raise_terminated(signum: int, frame: object) -> None:
    _SIGTERM_SEEN["seen"] = True
    raise Terminated()


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread (a no-op in other threads).

    :func:`init_ray` keeps this handler across ``ray.init`` (which installs its own)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """:func:`raise_on_sigterm` inside the block; the previous SIGTERM handler is back afterwards."""
    previous = signal.getsignal(signal.SIGTERM)
    _SIGTERM_SEEN["seen"] = False
    raise_on_sigterm()
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread() and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def interrupt_exit_code(e: KeyboardInterrupt) -> int:
    """130 for Ctrl-C (SIGINT), 143 after SIGTERM (:class:`Terminated`): the shell's 128 + signal (an
    interrupt that carries its ``signum``, like a stopped training run, gives that)."""
    if getattr(e, "signum", 0):
        return 128 + int(e.signum)
    term = isinstance(e, Terminated) or _SIGTERM_SEEN["seen"]
    return 128 + int(signal.SIGTERM if term else signal.SIGINT)


def ray_connected() -> bool:
    """True when this process is connected to Ray (without importing ray)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def stop_ray() -> None:
    """Disconnect from Ray now if connected (a local instance of :func:`init_ray` ends with it), so an
    interrupted job does not print Ray's reports about the tasks it cancelled on its way out."""
    if ray_connected():
        sys.modules["ray"].shutdown()


class _DropTokenNotice(logging.Filter):
    """Drops Ray's "Token authentication is enabled" notice (auth stays on; the *disabled* warning stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


_TOKEN_NOTICE = _DropTokenNotice()


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` / $RAY_ADDRESS when given, else start a fresh local instance.

    Unless verbose, Ray's start-up lines and Ray Data's execution lines and progress bars are off (module
    docstring), also when Ray was up already."""
    import ray

    if ray.is_initialized():  # attached before refseg ran (jobs/*.py): Ray Data stays quiet all the same
        quiet_data()
        return
    quiet = not verbose()
    if quiet:
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_TOKEN_NOTICE)
    level = logging.WARNING if quiet else logging.INFO
    keep_sigterm = signal.getsignal(signal.SIGTERM) is _raise_terminated
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=level)
    else:
        # A rank blocked in a CPU collective can stall Ray Train's health check of the group for
        # its 10-minute default after a peer dies; on a local instance, notice within 90 s.
        extensions = extensions_env()
        os.environ.update(extensions)  # --local trains in this process
        env = {"RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S", "90"),
               **extensions, **worker_env()}
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=level,
                 runtime_env={"env_vars": env, "worker_process_setup_hook": "refseg.runtime.setup_worker"})
    if keep_sigterm:  # ray.init replaced it
        raise_on_sigterm()
    quiet_data()


def local_env() -> None:
    """A one-rank process group's env vars for this process (Ray Train local mode, bench/gpu.py)."""
    import socket

    if os.environ.get("MASTER_PORT"):
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt(3) parameters


def keep_freed_memory(megabytes: int) -> bool:
    """Have glibc's malloc keep up to ``megabytes`` MB of freed memory in this process for reuse, and
    serve blocks below that size from its heap (``mallopt`` M_TRIM_THRESHOLD and M_MMAP_THRESHOLD).

    With glibc's defaults a CPU training step's large activations (a few MB each at debug sizes) are
    mmap-ed on allocation and unmapped on free, so every step touches fresh zero-filled pages: ~6 000
    page faults per debug-config step of a Ray Train worker and 11-17 % of its time on a 2-core VM
    (BENCHMARKS.md, "CPU step", session 15).
    Kept, the next step reuses the same pages. The cost is at most ``megabytes`` of memory the process
    holds after its peak instead of returning it. Returns False (and changes nothing) for 0 or without
    glibc (musl, macOS); the setting lasts for the life of the process."""
    if megabytes <= 0 or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    size = int(megabytes) * 2**20
    return bool(mallopt(M_MMAP_THRESHOLD, size)) and bool(mallopt(M_TRIM_THRESHOLD, size))


def actor_options(workers: int) -> dict:
    """Resources per inference actor: one GPU when the cluster has GPUs, else one CPU. Refuses a pool
    the cluster cannot hold (Ray Data would wait for the missing actors forever)."""
    import ray

    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0.0), res.get("CPU", 0.0)
    if gpus >= 1:
        if workers > gpus:
            raise ConfigError(f"--workers {workers} needs {workers} GPUs (one per actor) but the cluster has "
                              f"{gpus:g}; lower --workers")
        return {"num_gpus": 1, "num_cpus": 1 if cpus >= 2 * workers else 0}
    if workers > cpus:
        raise ConfigError(f"--workers {workers} needs {workers} CPUs (one per actor) but the cluster has "
                          f"{cpus:g}; lower --workers")
    return {"num_cpus": 1}
