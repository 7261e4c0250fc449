"""One trial: a Tune function trainable that runs one ``refseg train`` driver into ``DIR/trials/<trial_id>/``.

    train_trial(params, base=base, sweep_dir=DIR, metric="val_oiou", asha=True)   # inside Tune

ASHA's decisions are carried out by the trial itself. Tune would otherwise kill the trial's actor, and
the Train run inside would die ungracefully: its workers' placement group is freed only by Train's
cleaner, which needs the dashboard (off here) and one Ray instance per machine, so the leaked CPUs
would starve the next trials' data pipelines and the sweep would hang. So the scheduler
(:func:`graceful_asha`) writes ``trials/<id>/asha.json`` (:data:`DECISION`) for every result and returns
CONTINUE; the trial's report callback waits for it and, on "stop", ends the Train run (the controller
then shuts its workers down and frees their resources).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from refseg.io import write_text_atomic
from refseg.sweep.space import trial_config

DECISION = "asha.json"
DECISION_WAIT_S = 60.0


class EarlyStopped(RuntimeError):
    """Raised in the Train controller to end a run that ASHA stopped."""


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stopped(trial_dir: Path) -> bool:
    """Did ASHA stop the trial whose output dir is ``trial_dir``?"""
    return bool((_read_json(trial_dir / DECISION) or {}).get("stop"))


def graceful_asha(sweep_dir: str, **kw: Any) -> Any:
    """Tune's ASHAScheduler(**kw) whose STOP is recorded in ``trials/<id>/asha.json`` instead of enacted."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class GracefulASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            action = super().on_trial_result(tune_controller, trial, result)
            if "epoch" in result:
                path = Path(sweep_dir) / "trials" / trial.trial_id / DECISION
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, json.dumps({"epoch": result["epoch"], "stop": action == TrialScheduler.STOP}))
            return TrialScheduler.CONTINUE

    return GracefulASHA(**kw)


def _report_callback(metric: str, decision: Path | None) -> Any:
    """A TuneReportCallback (runs in the Train controller) that forwards only the epochs carrying
    ``metric`` (Tune requires it in every result) and, with ASHA, obeys the decision on each one."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if not metrics or metric not in metrics[0]:
                return
            super().after_report(run_context, metrics, checkpoint)
            epoch, deadline = metrics[0].get("epoch"), time.time() + DECISION_WAIT_S
            while decision is not None and epoch is not None and time.time() < deadline:
                d = _read_json(decision)
                if d and d["epoch"] >= epoch:
                    if d["stop"]:
                        raise EarlyStopped(f"ASHA stopped this trial after epoch {epoch}")
                    return
                time.sleep(0.2)

    return ValReportCallback()


def train_trial(params: dict, *, base: dict, sweep_dir: str, metric: str, asha: bool = False) -> None:
    """Tune function trainable: one ``refseg train`` run in ``<sweep_dir>/trials/<trial_id>/``."""
    import ray.tune

    from refseg.train.driver import finish_training, make_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    out = Path(sweep_dir) / "trials" / trial_id
    cfg = trial_config(base, params)
    cfg.train.name = f"{cfg.train.name or 'trial'}-{trial_id}"  # unique under a shared storage_path
    if (out / "summary.json").is_file():  # trained before an interruption: replay the epochs to Tune
        for h in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()):
            if metric in h:
                ray.tune.report(h)
        return
    # a restarted trial (interrupted sweep, resumed error) continues its Train run from its checkpoint
    trainer, run = make_trainer(cfg, out, resume=(out / "run.json").is_file(),
                                callbacks=[_report_callback(metric, out / DECISION if asha else None)])
    try:
        result = trainer.fit()
    except Exception:
        if stopped(out):
            return
        raise
    if result.error is not None and stopped(out):
        return
    finish_training(result, run)


def trial_dirname(trial: Any) -> str:
    """Tune's trial dir name: the trial id (the same as our ``trials/<trial_id>/``)."""
    return trial.trial_id
