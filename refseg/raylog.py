"""Keep the console to refseg's own progress lines unless asked for more (``refseg -v ...``).

Ray's defaults on a terminal: a Ray Data progress bar per dataset per worker, Ray Train's INFO record
of every ``report`` call, and -- on a local instance started without the dashboard -- a warning from
Train's placement-group cleaner every few seconds that the State API is unavailable. The figures
that matter are in refseg's lines and in metrics.jsonl.
"""

from __future__ import annotations

import logging
import os
import warnings

QUIET_ENV = "REFSEG_QUIET"  # set (to "1") in the runtime_env of local instances unless verbose
_NOISY_WORKER_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def verbose() -> bool:
    """True when the ``refseg`` logger shows INFO (``refseg -v``, or a caller's logging setup)."""
    return logging.getLogger("refseg").isEnabledFor(logging.INFO)


def quiet_worker() -> None:
    """Ray ``worker_process_setup_hook`` for local instances (a no-op unless $REFSEG_QUIET=1): silence
    the placement-group cleaner's State-API polling warning (it still works; without the dashboard
    it cannot ask whether the controller lives), Ray Train's record of every report (logged under
    its file path, outside LoggingConfig's reach), and DeepSpeed's deprecation warning about a torch
    collective it calls."""
    if os.environ.get(QUIET_ENV) != "1":
        return
    for name in _NOISY_WORKER_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: only the noise stays
        pass
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*", category=FutureWarning)


def worker_env() -> dict[str, str]:
    """env_vars for a local instance's runtime_env: :func:`quiet_worker` acts, and Ray Data logs
    warnings only (not "Starting execution of Dataset ...", its plan and "execution finished" for
    every dataset every epoch; Ray Data (re)configures its loggers on import, so a level set in the
    setup hook would not hold)."""
    return {} if verbose() else {QUIET_ENV: "1", "RAY_DATA_LOG_LEVEL": "WARNING"}


def quiet_data() -> None:
    """No Ray Data progress bars for the datasets created after this call (unless verbose)."""
    if verbose():
        return
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def train_log_level() -> str:
    """Ray Train's own console level: INFO shows a line for every ``report`` of every worker."""
    return "INFO" if verbose() else "WARNING"
