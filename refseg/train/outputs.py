"""A run's outputs: metrics.jsonl and curves.png as each epoch ends and the trackers fed from rank 0
(:class:`RunLog`); after fit(), the checkpoint to export, model.pt, artifact/, summary.json and the
trackers' artifacts (:func:`write_outputs`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

from refseg.config import Config
from refseg.io import new_figure, save_figure_atomic, write_text_atomic
from refseg.train.checkpoint import (
    NOT_VALIDATED,
    RunState,
    checkpoint_epoch,
    export_checkpoint,
    local_checkpoints,
    read_state,
    score_key,
)
from refseg.train.tracking import FINISHED, KILLED, STEP_PREFIX, Tracker, finish_trackers, open_trackers

# validation curves of curves.png: (metrics key, label, marker); classic runs have the first two
CURVES = (("val_oiou", "val oIoU", "o"), ("val_miou", "val mIoU", "s"), ("val_ciou", "val cIoU", "o"),
          ("val_giou", "val gIoU", "s"), ("val_n_acc", "val N-acc", "^"), ("val_t_acc", "val T-acc", "v"))


def _materialize(checkpoint, dest: Path) -> Path:
    """Copy a Ray Checkpoint (local or remote storage) to ``dest``."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.to_directory(str(dest))
    return dest


def plot_curves(history: list[dict], path: Path) -> None:
    """curves.png: train loss per epoch (left) and, where validated, val oIoU / mIoU (generalized data:
    cIoU / gIoU / N-acc / T-acc) (right)."""
    fig, (a, b) = new_figure(ncols=2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    a.plot(epochs, [h["loss"] for h in history], marker="o")
    a.set(xlabel="epoch", ylabel="train loss (BCE + Dice)", title="loss")
    drawn = False
    for key, label, marker in CURVES:
        val = [h for h in history if key in h]
        if val:
            b.plot([h["epoch"] for h in val], [h[key] for h in val], marker=marker, label=label)
            drawn = True
    if drawn:
        b.legend()
    b.set(xlabel="epoch", ylabel="IoU", title="validation", ylim=(0, 1))
    save_figure_atomic(fig, path)


def _local_checkpoints(out: Path, keep: int, key: str) -> tuple[Path, Path | None, RunState]:
    """Local mode: prune to best-K by ``key`` (:func:`score_key`) + latest; return (latest, best, the latest's
    run state). A stopped run's checkpoint inside an epoch is never scored (it was not validated)."""
    ckpts = local_checkpoints(out)
    latest = ckpts[-1]
    state = read_state(latest)
    by_epoch = {h["epoch"]: h for h in state.history}
    scored = [c for c in ckpts if key in by_epoch.get(checkpoint_epoch(c), {})]
    scored.sort(key=lambda c: by_epoch[checkpoint_epoch(c)][key], reverse=True)
    best = scored[0] if scored else None
    for c in ckpts:
        if c != latest and c not in scored[: max(1, keep)]:
            shutil.rmtree(c, ignore_errors=True)
    return latest, best, state


def interruption(cfg: Config, state: RunState, signum: int) -> dict | None:
    """Where a run that signal ``signum`` stopped ended, when before its last epoch: ``{"signal",
    "epochs_done", "step", "epoch_steps"}`` (optimizer steps into the next epoch); None for a finished run
    (or ``signum`` 0)."""
    steps = (state.partial or {}).get("steps", 0)
    if not signum or (not steps and state.epoch >= (state.epochs or cfg.train.epochs)):
        return None
    return {"signal": signal.Signals(signum).name, "epochs_done": state.epoch, "step": state.global_step,
            "epoch_steps": steps}


def write_outputs(cfg: Config, out: Path, result, *, local: bool, steps_per_epoch: int, wall_s: float,
                  stopped_by: int = 0) -> dict:
    """Write metrics.jsonl, curves.png, model.pt (from the best checkpoint by val oIoU -- val cIoU on
    generalized data, :func:`score_key` -- else the latest) and summary.json into ``out``; return the summary. A run stopped by signal ``stopped_by`` before its
    end gets ``"interrupted"`` (:func:`interruption`) and its outputs cover the epochs it finished."""
    key = score_key(cfg)
    if local:
        latest_dir, best_dir, state = _local_checkpoints(out, cfg.train.keep_checkpoints, key)
        best_path = str(best_dir or latest_dir)
    else:
        staging = Path(tempfile.mkdtemp(prefix="refseg-export-"))
        latest_dir = _materialize(result.checkpoint, staging / "latest")
        state = read_state(latest_dir)
        best_ckpt = result.checkpoint
        if cfg.train.val_every and result.best_checkpoints:
            scored = [(c, m) for c, m in result.best_checkpoints if m.get(key, NOT_VALIDATED) >= 0]
            if scored:
                best_ckpt = max(scored, key=lambda cm: cm[1][key])[0]
        best_dir = latest_dir if best_ckpt.path == result.checkpoint.path else _materialize(
            best_ckpt, staging / "best")
        best_path = best_ckpt.path
    history = state.history
    write_epoch_files(out, history)
    model_path = export_checkpoint(best_dir or latest_dir, out / "model.pt")
    val = [h for h in history if key in h]
    best = max(val, key=lambda h: h[key]) if val else None
    final = history[-1] if history else {}
    shown = ("oiou", "miou") if key == "val_oiou" else ("ciou", "giou", "n_acc", "t_acc")
    summary = {
        "best": {**{k: best[f"val_{k}"] for k in shown}, "epoch": best["epoch"]} if best else None,
        "final": {k: final[k] for k in ("epoch", "loss", *(f"val_{k}" for k in shown)) if k in final},
        "model_path": str(model_path),
        "best_checkpoint": best_path,
        "latest_checkpoint": str(latest_dir) if local else result.checkpoint.path,
        "epochs": state.epoch,
        "steps": state.global_step,
        "steps_per_epoch": steps_per_epoch,
        "wall_s": round(wall_s, 1),
        "resizes": state.resizes or [],  # elastic training: {time, from, to, why, epoch, step} per worker-count change
    }
    stop = interruption(cfg, state, stopped_by)
    if stop is not None:
        summary["interrupted"] = stop
    if not local:
        shutil.rmtree(staging, ignore_errors=True)
    from refseg.models.export import export_artifact

    # the hub layout (config.json + model.safetensors) of model.pt, with this summary as its training record
    summary["artifact_path"] = str(export_artifact(model_path, out / "artifact", training=dict(summary)))
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    if cfg.train.tracking:
        finish_trackers(cfg, out, json.loads((out / "run.json").read_text())["name"],
                        [out / n for n in ("curves.png", "metrics.jsonl", "summary.json", "artifact")],
                        FINISHED if stop is None else KILLED)
    return summary


def write_epoch_files(directory: Path, history: list[dict]) -> None:
    """curves.png and metrics.jsonl (one line per finished epoch) in ``directory``, each written atomically;
    metrics.jsonl last, so the curves of its epochs are there when it is."""
    plot_curves(history, directory / "curves.png")
    write_text_atomic(directory / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))


class RunLog:
    """Rank 0's record of a running training run: metrics.jsonl and curves.png rewritten as each epoch ends
    (a running or crashed run has them), and the trackers of ``train.tracking`` fed with the per-step
    figures and each epoch's metrics. On other ranks (``storage`` None, no trackers) it does nothing.

    ``storage``: None, a local dir, or ``(pyarrow filesystem, dir)`` -- the run's Ray storage when the
    output dir is not visible from rank 0's node (it is on the driver's node and not on a shared disk)."""

    def __init__(self, storage, trackers: list[Tracker]) -> None:
        self.storage, self.trackers = storage, trackers

    def step(self, step: int, metrics: dict) -> None:
        """The figures of optimizer step ``step`` (``loss``, ``lr``, ``samples_per_s``), as ``step/<name>``."""
        for t in self.trackers:
            t.log_metrics({f"{STEP_PREFIX}{k}": v for k, v in metrics.items()}, step)

    def epoch(self, history: list[dict]) -> None:
        """After each epoch: the epoch files over ``history``; its last line to every tracker."""
        if self.storage is None:
            return
        if isinstance(self.storage, Path):
            write_epoch_files(self.storage, history)
        else:
            from pyarrow.fs import LocalFileSystem, copy_files

            fs, directory = self.storage
            with tempfile.TemporaryDirectory(prefix="refseg-epoch-") as tmp:
                write_epoch_files(Path(tmp), history)
                for name in ("metrics.jsonl", "curves.png"):
                    copy_files(os.path.join(tmp, name), f"{directory}/{name}", source_filesystem=LocalFileSystem(),
                               destination_filesystem=fs)
        for t in self.trackers:
            t.log_metrics(history[-1], history[-1]["step"])

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def open_run_log(cfg: Config, output_dir: str, rank: int, resume_step: int) -> RunLog:
    """The :class:`RunLog` of this worker; ``resume_step``: the optimizer step it continues from."""
    if rank != 0:
        return RunLog(None, [])
    import ray.train

    context = ray.train.get_context()
    if os.path.isdir(output_dir):
        storage = Path(output_dir)
    else:
        run_storage = context.get_storage()
        storage = (run_storage.storage_filesystem, run_storage.experiment_fs_path)
    return RunLog(storage, open_trackers(cfg, output_dir, context.get_experiment_name(), resume_step))
