"""train.time_budget_s: fit the epoch count to the wall time a run may take.

After ``BUDGET_TIMED_EPOCHS`` timed epochs of a worker process the count is fitted to the seconds
left (every rank agrees on the smallest count), and re-fitted at every checkpoint epoch with the
mean of the latest ``BUDGET_WINDOW`` epochs, so it follows the machine's real pace (the first epochs
are slower: the first validation decodes the val split). The LR schedule is re-aimed at the new
last step each time, and the count is saved in the run state, so a restart or ``--resume`` keeps it.

    budget = TimeBudget.start(cfg.train.time_budget_s, cfg.train.epochs, state, t0)
    budget.record(state, time.time())                       # after every epoch
    if budget.due(state, last, checkpoint): n = budget.fit(state)
"""

from __future__ import annotations

import dataclasses

from refseg.config import Config
from refseg.train.checkpoint import RunState
from refseg.train.engine import all_reduce_min

BUDGET_TIMED_EPOCHS = 3  # epochs timed in this process (after its first) before fitting
BUDGET_WINDOW = 8  # epochs whose mean time a re-fit uses (the latest; start-up effects drop out)
BUDGET_MARGIN = 0.03  # share of train.time_budget_s kept free for the export after the last epoch


def fit_epochs(done: int, per_epoch_s: float, left_s: float, most: int) -> int:
    """The run's epoch count when ``done`` epochs are finished, each further one takes ``per_epoch_s``
    (validation and checkpoints included) and ``left_s`` seconds of the budget remain: at least one more
    (the last epoch validates, checkpoints and ends the schedule), at most ``most`` (train.epochs)."""
    more = min(float(most), max(0.0, left_s) // per_epoch_s) if per_epoch_s > 0 else most
    return max(done + 1, min(most, done + int(more)))


def budget_spent_before(state: RunState, t0: float) -> float:
    """Budget seconds that earlier ``refseg train`` calls of this run spent (a ``--resume`` continues their
    count; the pause between the calls is not counted). A restart after a worker failure within the call
    that started at ``t0`` keeps counting from ``t0``, so the time the failure cost is counted."""
    if state.budget_t0 == t0:
        return float(state.budget_spent_before_s or 0.0)
    return float(state.budget_used_s or 0.0)


def set_schedule_total(scheduler, total_steps: int) -> None:
    """Point every LambdaLR multiplier (engine.PolySchedule) at ``total_steps``."""
    for fn in getattr(scheduler, "lr_lambdas", []):
        if hasattr(fn, "set_total"):
            fn.set_total(total_steps)


def with_epochs(cfg: Config, epochs: int) -> Config:
    """``cfg`` with ``train.epochs = epochs`` (a copy)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=int(epochs)))


@dataclasses.dataclass
class TimeBudget:
    """The budget as one worker process sees it.

    ``seconds``: train.time_budget_s; ``most_epochs``: train.epochs as configured (a fit never exceeds
    it); ``t0``: ``time.time()`` when this ``refseg train`` call started; ``spent_before_s``: what
    earlier calls of the run spent; ``walls``: ``time.time()`` after each epoch this process ran;
    ``reserve_epochs``: epochs' worth of seconds kept free for work after the last epoch
    (train.no_target_refit_epochs: one)."""

    seconds: float
    most_epochs: int
    t0: float
    spent_before_s: float
    walls: list[float] = dataclasses.field(default_factory=list)
    reserve_epochs: int = 0

    @classmethod
    def start(cls, seconds: float, most_epochs: int, state: RunState, t0: float, reserve_epochs: int = 0) -> TimeBudget:
        return cls(float(seconds), most_epochs, t0, budget_spent_before(state, t0), reserve_epochs=reserve_epochs)

    def record(self, state: RunState, now: float) -> None:
        """An epoch (with its validation) ended at ``now``: count its seconds into the run state."""
        self.walls.append(now)
        state.budget_t0, state.budget_spent_before_s = self.t0, self.spent_before_s
        state.budget_used_s = self.spent_before_s + now - self.t0

    def due(self, state: RunState, last: bool, checkpoint: bool) -> bool:
        """Fit now? After the timed epochs, then at every checkpoint epoch (before its checkpoint,
        which saves the count); never after the last epoch."""
        timed = len(self.walls) > BUDGET_TIMED_EPOCHS
        return not last and timed and (state.epochs is None or checkpoint)

    def per_epoch_s(self) -> float:
        """Mean seconds of the latest ``BUDGET_WINDOW`` epochs (each with its validation and checkpoint)."""
        recent = self.walls[-(BUDGET_WINDOW + 1):]
        return (recent[-1] - recent[0]) / (len(recent) - 1)

    def fit(self, state: RunState) -> int:
        """The epoch count for the time left (the smallest of every rank), saved as ``state.epochs``."""
        left = self.seconds * (1 - BUDGET_MARGIN) - state.budget_used_s - self.reserve_epochs * self.per_epoch_s()
        state.epochs = all_reduce_min(fit_epochs(state.epoch, self.per_epoch_s(), left, self.most_epochs))
        return state.epochs
