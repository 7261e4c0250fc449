"""What a sweep writes into its directory DIR, and the trial records they are made from.

    state = SweepState.load(DIR)                # DIR/sweep.json: what ``refseg tune --resume`` needs
    summary = write_sweep_outputs(DIR, state)   # trials.csv, best.yaml, summary.json, trials.png

A trial record is ``{trial_id, params, status, history, error, trial_dir}``; ``history`` holds one dict
per validated epoch (epoch, val_oiou, val_miou, the sweep's metric, checkpoint_path) and ``status`` is
completed, early_stopped, error, pending or interrupted.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path

import yaml

from refseg.config import config_from_dict
from refseg.io import new_figure, save_figure_atomic, write_text_atomic
from refseg.sweep.space import plain_value, trial_config
from refseg.sweep.trial import stopped

SWEEP_FILE = "sweep.json"


@dataclasses.dataclass
class SweepState:
    """The contents of DIR/sweep.json: how the sweep was started, so ``--resume`` continues it as it was."""

    base: dict  # the raw config dict every trial starts from (relative paths made absolute)
    space: dict  # the search space as written: {dotted key: {kind: args}}
    output_dir: str  # DIR, absolute
    experiment_path: str  # Tune's experiment state: DIR/tune or <train.storage_path>/tune-<time>
    metric: str  # tune.metric
    mode: str  # tune.mode: "max" | "min"
    num_samples: int
    max_concurrent: int  # trials at once
    per_trial: dict  # {"CPU", "GPU", "data_CPU"} one trial holds (see space.per_trial_resources)
    scheduler: str  # tune.scheduler: "asha" | "none"

    def save(self) -> None:
        write_text_atomic(Path(self.output_dir) / SWEEP_FILE, json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, output_dir: str | Path) -> SweepState:
        return cls(**json.loads((Path(output_dir) / SWEEP_FILE).read_text()))


def collect_trials(state: SweepState) -> list[dict]:
    """One record per trial from Tune's experiment state + the trial's own output dir."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(state.experiment_path)
    frames = analysis.trial_dataframes
    records = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        tdir = Path(state.output_dir) / "trials" / trial.trial_id
        df = frames.get(trial.trial_id)
        history = []
        if df is not None and len(df) and "epoch" in df:
            cols = dict.fromkeys(("epoch", "val_oiou", "val_miou", state.metric, "checkpoint_path"))
            keep = [c for c in cols if c in df]
            rows = df[keep].drop_duplicates("epoch", keep="last").sort_values("epoch")
            history = [{k: plain_value(v) for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
                       for row in rows.to_dict("records")]
        error = None
        if trial.status == "ERROR":
            try:
                exc = trial.get_pickled_error()
                error = str(exc).strip().splitlines()[-1][:300] if exc is not None else "error"
            except Exception:  # noqa: BLE001 - the message is a nicety
                error = "error"
        status = {"ERROR": "error", "PENDING": "pending", "RUNNING": "interrupted", "PAUSED": "interrupted"}.get(
            trial.status)
        if status is None:  # TERMINATED: trained to the end, or stopped early by the scheduler
            status = "completed" if (tdir / "summary.json").is_file() or not stopped(tdir) else "early_stopped"
        records.append({"trial_id": trial.trial_id, "params": {k: plain_value(v) for k, v in trial.config.items()},
                        "status": status, "history": history, "error": error, "trial_dir": str(tdir)})
    return records


def best_of(history: list[dict], metric: str, mode: str) -> dict | None:
    """The epoch of ``history`` with the best ``metric`` (``mode`` "max" or "min"), None if never scored."""
    scored = [h for h in history if metric in h]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda h: h[metric])


def _trials_csv(records: list[dict], keys: list[str], metric: str, mode: str) -> str:
    """trials.csv: one row per trial with its parameters, best scores, epochs run and status."""
    extra = [] if metric in ("val_oiou", "val_miou") else [metric]
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(["trial_id", *keys, "best_val_oiou", "best_val_miou", *[f"best_{m}" for m in extra],
                "best_epoch", "epochs_run", "status", "error", "trial_dir"])
    for r in records:
        h, best = r["history"], best_of(r["history"], metric, mode) or {}
        values = [json.dumps(v) if isinstance(v := r["params"].get(k), list) else v for k in keys]
        top = [max((x[m] for x in h if m in x), default=None) for m in ("val_oiou", "val_miou")]
        w.writerow([r["trial_id"], *values, *top, *[best.get(m) for m in extra], best.get("epoch"),
                    max((x["epoch"] for x in h), default=0), r["status"], r["error"] or "", r["trial_dir"]])
    return f.getvalue()


def write_sweep_outputs(out: Path, state: SweepState, *, wall_s: float = 0.0,
                        records: list[dict] | None = None) -> dict:
    """trials.csv, best.yaml, summary.json and trials.png in ``out``; returns the summary."""
    records = collect_trials(state) if records is None else records
    metric, mode = state.metric, state.mode
    write_text_atomic(out / "trials.csv", _trials_csv(records, list(state.space), metric, mode))
    plot_trials(records, metric, out / "trials.png")
    ranked = [(r, b) for r in records if (b := best_of(r["history"], metric, mode)) is not None]
    summary: dict = {"metric": metric, "mode": mode, "num_trials": len(records),
                     "statuses": {s: sum(r["status"] == s for r in records) for s in
                                  sorted({r["status"] for r in records})},
                     "experiment_path": state.experiment_path, "wall_s": round(wall_s, 1), "best": None}
    if ranked:
        r, b = (max if mode == "max" else min)(ranked, key=lambda rb: rb[1][metric])
        tdir = Path(r["trial_dir"])
        model = tdir / "model.pt"
        trial_summary = json.loads((tdir / "summary.json").read_text()) if (tdir / "summary.json").is_file() else {}
        cfg = trial_config(state.base, r["params"])
        if (tdir / "config.yaml").is_file():  # what the trial really trained with (absolute paths, run name)
            cfg = config_from_dict(yaml.safe_load((tdir / "config.yaml").read_text()))
        write_text_atomic(out / "best.yaml", cfg.to_yaml())
        summary["best"] = {
            "trial_id": r["trial_id"], "params": r["params"], "status": r["status"], "value": b[metric],
            "epoch": b["epoch"], "val_oiou": b.get("val_oiou"), "val_miou": b.get("val_miou"),
            "trial_dir": str(tdir), "config": str(out / "best.yaml"),
            "model_path": str(model) if model.is_file() else None,
            "checkpoint_path": trial_summary.get("best_checkpoint") or b.get("checkpoint_path"),
        }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def plot_trials(records: list[dict], metric: str, path: Path) -> None:
    """trials.png: ``metric`` per epoch, one line per trial (labelled with its id and status)."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = new_figure(figsize=(7, 4.5))
    for r in records:
        pts = [(h["epoch"], h[metric]) for h in r["history"] if metric in h]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{r['trial_id']} ({r['status']})")
    ax.set(xlabel="epoch", ylabel=metric.replace("val_", "val "), title=f"{metric} per trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.lines:
        ax.legend(fontsize="small")
    save_figure_atomic(fig, path)
