"""Stopping a training run after a step on SIGINT (Ctrl-C) or SIGTERM (a spot node's notice).

The driver asks, every worker sees the request within ``POLL_S``, and the ranks agree after each
step (one all-reduce in ``epoch.train_epoch``) so all stop after the same one, save a checkpoint
and return::

    stop = StopRequest(local)                    # stop.name goes to the workers (LoopConfig.stop)
    with stop:                                   # the driver's SIGINT / SIGTERM handlers
        result = stop.run(trainer.fit)
    stop.signum                                  # the signal that asked, or 0

    watch = StopWatch(name)                      # in each worker
    watch.requested()                            # this process has seen the request

In Ray mode the request is a small named actor that a thread of each worker polls; with ``--local``
the loop runs in the driver and reads the driver's event directly. A second signal aborts at once:
the first one puts the previous handlers back.
"""

from __future__ import annotations

import signal
import sys
import threading
import uuid
from collections.abc import Callable
from typing import Any, Self

POLL_S = 0.5  # how often a worker asks the driver's actor
NAMESPACE = "refseg"
_LOCAL: dict[str, threading.Event] = {}  # --local: the driver's events by name (the loop runs in this process)


class TrainingStopped(KeyboardInterrupt):
    """``run_training`` ended early on signal ``signum`` after saving a checkpoint: ``summary`` is the run's
    summary dict, with ``"interrupted"`` saying where (``resume=True`` continues from there)."""

    def __init__(self, signum: int, summary: dict) -> None:
        super().__init__(signum)
        self.signum, self.summary = signum, summary


class StopFlag:
    """The Ray actor behind a :class:`StopRequest`: holds the signal number that asked to stop (0: none)."""

    def __init__(self) -> None:
        self.signum = 0

    def set(self, signum: int) -> None:
        self.signum = signum

    def get(self) -> int:
        return self.signum


class StopRequest:
    """The driver's side: while entered, SIGINT and SIGTERM ask the workers to stop (see the module doc).

    ``local``: the loop runs in this process (Ray Train local mode); otherwise the request is the named
    actor ``name`` (Ray must be initialised before entering)."""

    def __init__(self, local: bool) -> None:
        self.local = local
        self.name = f"refseg-stop-{uuid.uuid4().hex[:12]}"
        self.signum = 0
        self.event = threading.Event()
        self.actor: Any = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if self.local:
            _LOCAL[self.name] = self.event
        else:
            import ray

            self.actor = ray.remote(num_cpus=0)(StopFlag).options(name=self.name, namespace=NAMESPACE).remote()
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()
        _LOCAL.pop(self.name, None)
        if self.actor is not None:
            import ray

            ray.kill(self.actor)

    def _restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        self._restore()  # a second signal aborts
        self.signum = signum
        self.event.set()
        if self.actor is not None:
            self.actor.set.remote(signum)
        again = "press Ctrl-C again" if signum == signal.SIGINT else "send SIGTERM again"
        sys.stderr.write(f"refseg: {signal.Signals(signum).name} received: stopping after the current step to save "
                         f"a checkpoint ({again} to abort without one)\n")
        sys.stderr.flush()

    def run(self, fit: Callable[[], Any]) -> Any:
        """``fit()``; in Ray mode in a thread, so that Ray Train's own SIGINT handler (an abort without a
        checkpoint), which ``fit`` installs when it runs in the main thread, stays out."""
        if self.local or threading.current_thread() is not threading.main_thread():
            return fit()
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = fit()
            except Exception as e:  # noqa: BLE001 - raised again in the calling thread below
                box["error"] = e

        thread = threading.Thread(target=target, name="refseg-fit", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.2)  # a short wait, so signal handlers run in this (the main) thread
        if "error" in box:
            raise box["error"]
        return box["result"]


class StopWatch:
    """A worker's side: ``requested()`` is True once the driver's :class:`StopRequest` ``name`` has been
    signalled (None: never, e.g. a sweep's trials)."""

    def __init__(self, name: str | None) -> None:
        if name in _LOCAL:  # --local: the driver's own event
            self.event = _LOCAL[name]
            return
        self.event = threading.Event()
        if name is not None:
            import ray

            actor = ray.get_actor(name, namespace=NAMESPACE)
            threading.Thread(target=self._poll, args=(actor,), name="refseg-stop-watch", daemon=True).start()

    def _poll(self, actor: Any) -> None:
        import ray

        while not self.event.is_set():
            try:
                if ray.get(actor.get.remote()):
                    self.event.set()
            except ray.exceptions.RayError:  # the driver, and its actor with it, has gone
                return
            self.event.wait(POLL_S)

    def requested(self) -> bool:
        return self.event.is_set()
