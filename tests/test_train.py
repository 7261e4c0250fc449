"""Distributed training: real Ray Train TorchTrainer + real DeepSpeed engines on CPU workers.

Failures come the way an operator sees them: a Ray Train worker process is SIGKILLed from outside once
the run has registered a checkpoint (:class:`WorkerKiller`), or a ``--local`` run in a subprocess
crashes at a chosen step (tests/crash_at_step.py patches its engine from tests/).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

import pytest
import torch

from refseg.config import ConfigError, load_config
from refseg.train.engine import lr_lambda

REPO = Path(__file__).resolve().parents[1]
CRASH = Path(__file__).resolve().parent / "crash_at_step.py"
# |a run's best val oIoU - that of its model.pt evaluated on its own|: every rank validates with its own
# BatchNorm running statistics (model.pt holds rank 0's) and in the engine's precision (bf16 or fp32)
OIOU_TOLERANCE = 0.02


def small_cfg(root: Path, *extra: str):
    """Tiny model, 64 px, 2 workers x 0.5 CPU, a few steps per epoch, ZeRO-2 (configs/debug.yaml's own
    ZeRO-0 runs in the end-to-end tests below; ``extra`` overrides come last and win)."""
    return load_config(REPO / "configs" / "debug.yaml", [
        "deepspeed.zero_stage=2", f"data.root={root}", "data.synthetic=false", "data.image_size=64", "data.augment=false",
        "train.epochs=3", "train.batch_size=4", "train.max_steps_per_epoch=4", "train.warmup_steps=0",
        "train.val_every=1", "train.checkpoint_every=1", "train.log_every=2", "train.lr=3e-3",
        "eval.batch_size=16", *extra,
    ])


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def registered_checkpoint(run_dir: Path) -> dict | None:
    """The metrics of the latest checkpoint Ray Train has registered for the run stored in ``run_dir``
    (its checkpoint_manager_snapshot.json), or None before the first one."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or being written
        return None
    latest = snapshot.get("latest_checkpoint_result")
    return latest["metrics"] if latest else None


def train_worker_pids() -> set[int]:
    """The Ray Train worker processes (``ray::RayTrainWorker...``) of this session's Ray instance: its
    raylet is a child of this process, its workers the raylet's."""
    import psutil

    pids = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                pids.add(p.pid)
        except psutil.Error:  # ended meanwhile
            pass
    return pids


class WorkerKiller(threading.Thread):
    """Watches the run stored in ``run_dir``; once it has registered the checkpoint of ``epoch`` (or a
    later one), SIGKILLs one Ray Train worker process. ``at_kill``: that checkpoint's metrics;
    ``pids``: every Ray Train worker process seen while the run went on."""

    def __init__(self, run_dir: Path, epoch: int) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.epoch = run_dir, epoch
        self.at_kill: dict | None = None
        self.killed: int | None = None
        self.pids: set[int] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            workers = train_worker_pids()
            self.pids |= workers
            metrics = registered_checkpoint(self.run_dir) if self.killed is None else None
            if metrics and metrics["epoch"] >= self.epoch and workers:
                self.killed = max(workers)
                self.at_kill = metrics
                os.kill(self.killed, signal.SIGKILL)
            time.sleep(0.1)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_two_workers_loss_falls(ray_session, synthetic_root, tmp_path, stage):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from refseg.infer import evaluate
    from refseg.models.export import load_model
    from refseg.train import run_training
    from refseg.train.checkpoint import CKPT_TAG

    precision = "fp32" if stage == 3 else "bf16"
    # stage 1 streams its training data through Ray Data every epoch; 2 and 3 train from the per-worker
    # decoded cache (data.cache, as configs/debug.yaml does). 4 epochs of 6 steps: fewer fall inside
    # the sentence-sampling noise of the epoch-mean loss.
    extra = [f"deepspeed.zero_stage={stage}", f"train.precision={precision}", f"data.cache={stage != 1}",
             "train.epochs=4", "train.max_steps_per_epoch=6"]
    cfg = small_cfg(synthetic_root, *extra)
    out = tmp_path / f"zero{stage}"
    summary = run_training(cfg, out)
    hist = history(out)
    losses = [h["loss"] for h in hist]
    assert len(hist) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    assert summary["steps"] == 4 * summary["steps_per_epoch"] == hist[-1]["step"]
    for name in ("summary.json", "config.yaml", "metrics.jsonl", "curves.png", "model.pt"):
        assert (out / name).is_file(), name
    assert "val_prec_50" in hist[-1]
    # model.pt holds exactly the fp32 weights DeepSpeed consolidates from the run's best checkpoint
    # (with ZeRO-3: the shards of both ranks merged), loadable without DeepSpeed
    model, full_cfg = load_model(out / "model.pt")
    assert full_cfg["deepspeed"]["zero_stage"] == stage
    best = Path(summary["best_checkpoint"])
    expected = get_fp32_state_dict_from_zero_checkpoint(str(best), tag=CKPT_TAG)
    mine = model.state_dict()
    assert expected.keys() <= mine.keys()
    for key, value in expected.items():
        assert torch.equal(mine[key], value.float()), key
    # an independent evaluation of model.pt (refseg.infer.evaluate: Ray Data actors, fp32, at the training
    # resolution) gives the best val oIoU the run reported: model.pt is that checkpoint
    metrics = evaluate(out / "model.pt", synthetic_root, "refcoco", "unc", "val", at_train_res=True,
                       output=tmp_path / "eval")["at_train_res"]
    assert metrics["num_samples"] == hist[-1]["val_samples"]
    print(f"ZeRO-{stage}: run {summary['best']}, model.pt evaluated: oIoU {metrics['oiou']:.4f}")
    assert metrics["oiou"] == pytest.approx(summary["best"]["oiou"], abs=OIOU_TOLERANCE)


@pytest.mark.slow
def test_worker_killed_mid_run_restarts_from_checkpoint(ray_session, synthetic_root, tmp_path):
    from refseg.train import run_training

    cfg = small_cfg(synthetic_root, "train.max_failures=1", "train.val_every=0",
                    f"train.storage_path={tmp_path / 'storage'}", "train.name=ft")
    out = tmp_path / "ft"
    with WorkerKiller(tmp_path / "storage" / "ft", epoch=1) as killer:
        summary = run_training(cfg, out)
    assert killer.killed is not None, "the run ended before a worker could be killed"
    assert len(killer.pids) > 2  # the killed group was replaced by new worker processes
    hist = history(out)
    assert [h["epoch"] for h in hist] == [1, 2, 3]  # every epoch counted once
    assert [h["step"] for h in hist] == [4, 8, 12] and summary["steps"] == 12
    # the epochs up to the registered checkpoint were restored from it, not trained again
    assert hist[killer.at_kill["epoch"] - 1] == killer.at_kill


@pytest.mark.slow
def test_resume_after_stop_continues_step_and_schedule(ray_session, synthetic_root, tmp_path):
    from ray.train import TrainingFailedError

    from refseg.train import run_training

    cfg = small_cfg(synthetic_root, "train.max_failures=0", "train.val_every=0", "train.warmup_steps=2",
                    f"train.storage_path={tmp_path / 'storage'}", "train.name=resume")
    out = tmp_path / "resume"
    with WorkerKiller(tmp_path / "storage" / "resume", epoch=1) as killer, pytest.raises(TrainingFailedError):
        run_training(cfg, out)  # a worker is killed after the run checkpointed epoch 1: no restart allowed
    assert killer.at_kill["epoch"] < 3 and not (out / "summary.json").exists()
    with pytest.raises(ConfigError, match="already holds a run"):
        run_training(cfg, out)
    summary = run_training(cfg, out, resume=True)
    hist = history(out)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert [h["step"] for h in hist] == [4, 8, 12]
    assert hist[killer.at_kill["epoch"] - 1] == killer.at_kill  # continued from that checkpoint
    # the LR schedule continued where it stopped: identical to an uninterrupted warmup + poly schedule
    f = lr_lambda(12, 2, cfg.train.poly_power)
    for h in hist:
        assert h["lr"] == pytest.approx(cfg.train.lr * f(h["step"]), rel=1e-6)
    assert summary["steps"] == 12


@pytest.mark.slow
def test_time_budget_fits_the_epochs_and_a_resume_keeps_them(synthetic_root, tmp_path):
    """train.time_budget_s: after 3 timed epochs the count is fitted (this budget is spent already: one more
    epoch) and the LR schedule ends at the new last step; a run that dies after the fit resumes with the
    fitted count and schedule from its checkpoint (not train.epochs, not a second fit, which would add 3
    more timed epochs). Local mode: its checkpoints are written before the next step, so which one a
    resume starts from does not depend on when Ray registered it."""
    from crash_at_step import CRASHED

    out = tmp_path / "budget"
    args = ["train", "--config", str(REPO / "configs" / "debug.yaml"),
            "--output-dir", str(out), "--local", f"data.root={synthetic_root}", "data.synthetic=false",
            "data.image_size=64", "data.augment=false", "train.batch_size=4", "train.max_steps_per_epoch=4",
            "train.val_every=0", "train.checkpoint_every=1", "train.warmup_steps=2", "train.lr=2e-3",
            "train.epochs=40", "train.time_budget_s=1"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    # the process crashes after step 18 (in epoch 5, after the fit and epoch 4's checkpoint)
    first = subprocess.run([sys.executable, str(CRASH), "18", *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600, check=False)
    assert first.returncode == CRASHED, first.stderr[-3000:]
    assert max(p.name for p in (out / "checkpoints").iterdir()) == "epoch_0004"
    assert "-> 5 epochs" in first.stdout + first.stderr  # the fit, announced once
    second = subprocess.run([sys.executable, "-m", "refseg.cli", *args, "--resume"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    hist = history(out)
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4, 5]
    assert summary["epochs"] == 5 and summary["steps"] == 20
    f = lr_lambda(160, 2, 0.9)  # the schedule of train.epochs=40 until the fit
    for h in hist[:4]:
        assert h["lr"] == pytest.approx(2e-3 * f(h["step"]), rel=1e-6)
    assert hist[4]["lr"] == 0.0  # re-aimed at step 20 and restored by the resume


def test_shuffled_expressions_shuffle_training_only(ray_session, synthetic_root):
    """data.shuffle_expressions=true (the control run) pairs every training image with another ref's
    expression, while validation still scores every val sentence with its own image."""
    from refseg.data import load_split
    from refseg.train.driver import build_datasets

    cfg = small_cfg(synthetic_root, "data.shuffle_expressions=true", "data.cache=false")
    datasets, _ = build_datasets(cfg, world=2)

    def pairs(split: str) -> set[tuple[int, int]]:
        return {(r["ref_id"], r["sent_id"]) for r in load_split(synthetic_root, "refcoco", "unc", split)}

    val = [(int(r), int(s)) for name in ("val_0", "val_1")
           for b in datasets[name].iter_batches(batch_format="numpy") for r, s in zip(b["ref_id"], b["sent_id"])]
    assert len(val) == len(set(val)) and set(val) == pairs("val")
    train = [(int(row["ref_id"]), int(row["sent_id"])) for row in datasets["train"].take_all()]
    true_train = pairs("train")
    assert train and not any(pair in true_train for pair in train)


def test_fit_epochs_to_the_time_left():
    from refseg.train.budget import fit_epochs

    assert fit_epochs(4, 10.0, 815.0, 150) == 85  # 81 more 10-second epochs fit into 815 s
    assert fit_epochs(4, 10.0, 5.0, 150) == 5  # spent: one more epoch (the last validates and checkpoints)
    assert fit_epochs(4, 10.0, -30.0, 150) == 5
    assert fit_epochs(4, 1.0, 1e6, 150) == 150 and fit_epochs(4, 10.0, math.inf, 150) == 150  # at most epochs


def test_time_budget_counts_across_resumes_not_the_pause():
    from refseg.train.budget import budget_spent_before
    from refseg.train.checkpoint import RunState

    assert budget_spent_before(RunState(), 1000.0) == 0.0  # a new run (or a checkpoint from before budgets)
    ckpt = RunState(budget_t0=1000.0, budget_spent_before_s=0.0, budget_used_s=300.0)
    assert budget_spent_before(ckpt, 1000.0) == 0.0  # restart within the same call: counts from its start
    assert budget_spent_before(ckpt, 5000.0) == 300.0  # --resume later: the first call's 300 s, not the pause
    resumed = RunState(budget_t0=5000.0, budget_spent_before_s=300.0, budget_used_s=420.0)
    assert budget_spent_before(resumed, 5000.0) == 300.0 and budget_spent_before(resumed, 9000.0) == 420.0


def test_run_state_keeps_the_checkpoint_json_format():
    """refseg_state.json as checkpoints hold it (with and without a time budget) loads into RunState and is
    written back byte for byte, so older checkpoints resume."""
    from refseg.train.checkpoint import RunState

    plain = {"epoch": 2, "global_step": 8, "history": [
        {"epoch": 1, "step": 4, "lr": 0.002, "loss": 0.91, "samples": 32, "elapsed_s": 12.5},
        {"epoch": 2, "step": 8, "lr": 0.0015, "loss": 0.84, "samples": 32, "val_oiou": 0.31, "elapsed_s": 20.25}]}
    budget = {**plain, "budget_t0": 1000.5, "budget_spent_before_s": 0.0, "budget_used_s": 42.25, "epochs": 5}
    for saved in (plain, budget):
        text = json.dumps(saved, indent=1)
        state = RunState.from_dict(json.loads(text))
        assert json.dumps(state.to_dict(), indent=1) == text
    assert RunState.from_dict(budget).epochs == 5 and RunState.from_dict(plain).epochs is None


def test_bad_time_budget_is_one_sentence_before_ray(tmp_path, capsys):
    from refseg.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--config", str(REPO / "configs" / "debug.yaml"), "--output-dir", str(out),
               "train.time_budget_s=0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("refseg: error: train.time_budget_s must be a positive number of seconds "
                               "(or null for no budget), got 0.0")
    assert not out.exists()


def test_resource_check_refuses_a_config_that_would_hang(ray_session, synthetic_root, tmp_path):
    from refseg.train import run_training

    cfg = small_cfg(synthetic_root, "train.cpus_per_worker=1.0")
    with pytest.raises(ConfigError, match="data pipeline would starve"):
        run_training(cfg, tmp_path / "starve")


def test_fp16_on_cpu_is_a_clear_error(ray_session, synthetic_root, tmp_path):
    from refseg.train import run_training

    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        run_training(small_cfg(synthetic_root, "train.precision=fp16"), tmp_path / "fp16")


def test_every_checkpoint_epoch_is_validated():
    """Checkpoints are ranked by val_oiou, so an epoch that checkpoints also validates (a checkpoint reported
    without the score makes Ray log an error and rank it -inf, e.g. with val_every=4, checkpoint_every=2)."""
    from refseg.config import TrainConfig
    from refseg.train.epoch import epoch_actions

    def plan(**kw):
        train = TrainConfig(epochs=9, **kw)
        acts = [epoch_actions(e, train) for e in range(1, 10)]
        return [e for e, (v, _) in enumerate(acts, 1) if v], [e for e, (_, c) in enumerate(acts, 1) if c]

    assert plan(val_every=4, checkpoint_every=2) == ([2, 4, 6, 8, 9], [2, 4, 6, 8, 9])
    assert plan(val_every=2, checkpoint_every=3) == ([2, 3, 4, 6, 8, 9], [3, 6, 9])
    assert plan(val_every=0, checkpoint_every=2) == ([], [2, 4, 6, 8, 9])
    assert plan(val_every=1, checkpoint_every=100) == (list(range(1, 10)), [9])


def test_model_layout_error_is_one_sentence_from_the_driver(tmp_path, capsys):
    """A model the workers could not build fails in the driver before the output dir exists: one line."""
    from refseg.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--config", str(REPO / "configs" / "debug.yaml"), "--output-dir", str(out),
               "model.dim=64", "model.fusion.num_heads=3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == "refseg: error: model: model.dim=64 must be divisible by fusion.num_heads=3."
    assert not out.exists()


def test_bad_augmentation_setting_is_one_sentence_before_ray(tmp_path, capsys):
    from refseg.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--config", str(REPO / "configs" / "debug.yaml"), "--output-dir", str(out), "data.min_scale=0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("refseg: error: data.min_scale must lie in (0, 1] (the zoom-out draws a scale in "
                               "[min_scale, 1]), got 0.0; 1 turns the zoom-out off")
    assert not out.exists()


def test_uncached_pretrained_text_encoder_offline_is_one_sentence(tmp_path, capsys, monkeypatch):
    """configs/refcoco_r101.yaml on an air-gapped machine without bert-base-uncased cached: one line from
    the driver in seconds, no output dir -- not a minute of download retries in the driver and every worker."""
    from huggingface_hub import constants

    from refseg.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    out = tmp_path / "run"
    rc = main(["train", "--config", str(REPO / "configs" / "refcoco_r101.yaml"), "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("refseg: error: model.text.encoder='bert-base-uncased': its pretrained weights are not "
                          "in the local Hugging Face cache") and "HF_HUB_OFFLINE is set" in err
    assert not out.exists()


@pytest.mark.slow
def test_local_mode_cli_single_process(synthetic_root, tmp_path):
    """`refseg train --local`: the loop runs in the driver process (a subprocess here, own Ray)."""
    out = tmp_path / "local"
    args = [sys.executable, "-m", "refseg.cli", "train", "--config", str(REPO / "configs" / "debug.yaml"),
            "--output-dir", str(out), "--local", f"data.root={synthetic_root}", "data.synthetic=false",
            "data.image_size=64", "train.epochs=2", "train.batch_size=4", "train.max_steps_per_epoch=3",
            "train.precision=fp32", "train.val_every=1"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and Path(summary["model_path"]).is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir())  # real checkpoint dirs in local mode


def test_cli_missing_data_root_is_one_sentence(ray_session, tmp_path, capsys):
    from refseg.cli import main

    rc = main(["train", "--config", str(REPO / "configs" / "debug.yaml"), "--output-dir", str(tmp_path / "run"),
               "data.synthetic=false", f"data.root={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("refseg: error: data root") and "data.synthetic=true" in err and "Traceback" not in err


def test_validation_scores_the_image_not_keep_aspects_padding():
    from refseg.train.epoch import on_image

    pred = torch.ones(2, 8, 8, dtype=torch.bool)
    batch = {"orig_h": [100, 30], "orig_w": [50, 60]}  # on the 8 x 8 canvas: 8 x 4 and 4 x 8 of image
    kept = on_image(pred, batch, keep_aspect=True)
    assert kept[0, :, :4].all() and not kept[0, :, 4:].any()
    assert kept[1, :4].all() and not kept[1, 4:].any()
    assert torch.equal(on_image(pred, batch, keep_aspect=False), pred)  # a plain resize fills the canvas
