"""Ctrl-C (SIGINT) and SIGTERM during `refseg train`: every worker stops after the same step with a
checkpoint, the CLI ends with one sentence naming the --resume command, and that command finishes the run
with every epoch counted once -- the interrupted one continued from its next batch, its metrics over the
whole epoch.

The slow tests run the real CLI in a subprocess on the session's synthetic set and send the signal once
the progress line of epoch 2 appears: in Ray mode (2 workers, ZeRO-2) with SIGTERM, with --local with
SIGINT.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from refseg.config import load_config
from refseg.train.checkpoint import RunState, check_resume, read_state
from refseg.train.engine import lr_lambda

REPO = Path(__file__).resolve().parents[1]
DEBUG = REPO / "configs" / "debug.yaml"
STEPS = 12  # optimizer steps per epoch (train.max_steps_per_epoch), in both modes
LR = 3e-3
SENTENCE = re.compile(r"^refseg: stopped by (SIGINT|SIGTERM) in epoch 2 after step (\d+) \((\d+) of its 12 steps\) "
                      r"and saved a checkpoint; continue with: (.+)$")


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    """3 epochs of 12 steps, validated every epoch, checkpointed every 2: epoch 1 lives in no checkpoint
    of its own when the run stops inside epoch 2. ``extra``: flags (--local) and overrides."""
    flags = [x for x in extra if x.startswith("--")]
    return ["train", "--config", str(DEBUG), "--output-dir", str(out), *flags, f"data.root={root}",
            "data.synthetic=false", "data.image_size=64", "data.augment=false", "train.epochs=3",
            "train.batch_size=4", f"train.max_steps_per_epoch={STEPS}", "train.time_budget_s=null",
            "train.warmup_steps=0", "train.val_every=1", "train.checkpoint_every=2", "train.log_every=1",
            "deepspeed.zero_stage=2",  # the sharded optimizer states (configs/debug.yaml runs ZeRO-0)
            f"train.lr={LR}", *(x for x in extra if x not in flags)]


def run_cli(args: list[str], cwd: Path, send: signal.Signals | None = None, when: str = "",
            timeout: float = 1200) -> tuple[int, list[str]]:
    """`refseg <args>` in a subprocess (own Ray instance); ``send`` goes to it once a line contains ``when``.
    Returns (exit status, stdout and stderr lines)."""
    proc = subprocess.Popen([sys.executable, "-m", "refseg.cli", *args], cwd=cwd, env={**os.environ, "RAY_ADDRESS": ""},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if send is not None and when in line:
            proc.send_signal(send)
            send = None
    rc = proc.wait()
    watchdog.cancel()
    return rc, lines


def logged_losses(lines: list[str]) -> list[float]:
    return [float(m.group(1)) for line in lines if (m := re.search(r"\[refseg\] epoch \d+/3 step \d+/12 loss ([\d.]+)",
                                                                   line))]


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def stop_and_resume(root: Path, tmp_path: Path, send: signal.Signals, world: int, *extra: str) -> None:
    out = tmp_path / "run"
    rc, lines = run_cli(train_args(root, out, *extra), tmp_path, send, when="epoch 2/3 step 2/12")
    text = "\n".join(lines)
    assert rc == 128 + send, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    stopped = SENTENCE.match(lines[-1])
    assert stopped, lines[-5:]
    assert sum(line.startswith("refseg: stopped by") for line in lines) == 1
    name, step, epoch_steps, command = stopped.groups()
    step, epoch_steps = int(step), int(epoch_steps)
    assert name == send.name and 2 <= epoch_steps < STEPS and step == STEPS + epoch_steps
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] == {"signal": send.name, "epochs_done": 1, "step": step, "epoch_steps": epoch_steps}
    first = history(out)
    assert [h["epoch"] for h in first] == [1]  # the finished epoch, although checkpoint_every=2
    check_resume(out, local="--local" in extra)  # a checkpoint to continue from
    partial = read_state(Path(summary["latest_checkpoint"])).partial  # the run's storage is local here
    assert partial["steps"] == epoch_steps and len(set(partial["seen"])) == epoch_steps * 4 * world

    argv = shlex.split(command)  # the command the sentence names, run as it is
    assert argv[:2] == ["refseg", "train"] and "--resume" in argv
    rc, resumed = run_cli(argv[1:], tmp_path)
    text = "\n".join(resumed)
    assert rc == 0, text[-3000:]
    assert f"resumed at epoch 1 step {step}, {epoch_steps} steps into epoch 2" in text
    hist = history(out)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert [h["step"] for h in hist] == [STEPS, 2 * STEPS, 3 * STEPS]
    assert all(h["samples"] == STEPS * 4 * world for h in hist)  # epoch 2: before and after the stop together
    assert hist[0] == first[0]  # restored, not trained again
    schedule = lr_lambda(3 * STEPS, 0, 0.9)  # the LR schedule continued where it stopped
    for h in hist:
        assert h["lr"] == pytest.approx(LR * schedule(h["step"]), rel=1e-6)
    # the weights continued too: the resumed steps' losses are below the first steps' of the run
    assert np.mean(logged_losses(resumed)) < np.mean(logged_losses(lines)[:3]), (logged_losses(lines),
                                                                                 logged_losses(resumed))
    assert json.loads((out / "summary.json").read_text()).get("interrupted") is None


@pytest.mark.slow
def test_sigterm_in_ray_mode_stops_with_a_checkpoint_and_resumes(synthetic_root, tmp_path):
    """2 workers, ZeRO-2, training from the per-worker decoded cache (data.cache, as configs/debug.yaml)."""
    stop_and_resume(synthetic_root, tmp_path, signal.SIGTERM, 2)


@pytest.mark.slow
def test_sigint_with_local_stops_with_a_checkpoint_and_resumes(synthetic_root, tmp_path):
    """--local, streaming its training batches from Ray Data every epoch (data.cache=false)."""
    stop_and_resume(synthetic_root, tmp_path, signal.SIGINT, 1, "--local", "data.cache=false")


def test_resume_of_a_dir_that_never_ran_is_one_sentence(tmp_path, capsys, monkeypatch):
    """No run.json, or a run.json without any checkpoint: one sentence, exit 2, before Ray, nothing created."""
    from refseg.cli import main
    from refseg.train import driver

    def no_ray(*a, **k):
        raise AssertionError("Ray started")

    monkeypatch.setattr(driver, "init_ray", no_ray)
    never = tmp_path / "never"
    t0 = time.perf_counter()
    rc = main(["train", "--config", str(DEBUG), "--output-dir", str(never), "--resume"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == (f"refseg: error: --resume: '{never}' holds no run to continue (no run.json); "
                               "start the run without --resume")
    assert not never.exists() and time.perf_counter() - t0 < 3

    started = tmp_path / "started"  # killed before its first checkpoint
    started.mkdir()
    (started / "run.json").write_text(json.dumps({"name": "r", "storage_path": str(started / "ray")}))
    for local in ([], ["--local"]):
        rc = main(["train", "--config", str(DEBUG), "--output-dir", str(started), "--resume", *local])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err == (f"refseg: error: --resume: the run in '{started}' has no checkpoint to continue "
                                   "from (it stopped before its first one); start it again without --resume in a "
                                   "new --output-dir")
        assert sorted(p.name for p in started.iterdir()) == ["run.json"]


class FakeEngine:
    """A DeepSpeed engine stand-in that never changes: each batch's loss depends on the batch alone."""

    def __init__(self) -> None:
        self.steps = 0

    def train(self) -> None:
        pass

    def __call__(self, image, ids, attn) -> dict:
        return {"logits": image.mean(1, keepdim=True)}

    def backward(self, loss) -> None:
        pass

    def step(self) -> None:
        self.steps += 1


def batches(order: list[int], size: int = 4) -> list[dict]:
    """Batches of rows (ref_id r: image filled with r / 40 - 0.5) in ``order``."""
    out = []
    for i in range(0, len(order) - size + 1, size):
        ids = np.array(order[i:i + size])
        image = np.broadcast_to((ids / 40 - 0.5)[:, None, None, None], (size, 3, 8, 8)).astype(np.float32)
        out.append({"image": image, "mask": (np.arange(64).reshape(8, 8) % 3 == 0)[None].repeat(size, 0).astype(
            np.float32), "input_ids": np.ones((size, 4), np.int64), "attention_mask": np.ones((size, 4), np.int64),
            "ref_id": ids})
    return out


def test_a_stopped_epoch_carries_its_sums_and_resumes_with_the_rest():
    from refseg.train.epoch import WorkerContext, train_epoch, unseen_batches

    cfg = load_config(DEBUG, ["train.batch_size=4", "train.log_every=1000"])
    ctx = WorkerContext(0, 1, torch.device("cpu"), torch.float32, steps_per_epoch=8)
    order = list(range(40))
    whole = train_epoch(FakeEngine(), batches(order), cfg, RunState(), ctx, lambda: False)

    engine, state = FakeEngine(), RunState()
    assert train_epoch(engine, batches(order), cfg, state, ctx, lambda: engine.steps >= 3) is None
    assert state.global_step == 3 and state.partial["steps"] == 3 and state.partial["seen"] == list(range(12))
    assert state.partial["samples"] == 12 and state.partial["losses"] == 3
    rest = unseen_batches(batches(order), state.partial["seen"], 4, spare=0)
    stats = train_epoch(FakeEngine(), rest, cfg, state, ctx, lambda: False)
    assert state.global_step == 8 and state.partial is None
    assert stats["samples"] == whole["samples"] == 32
    assert stats["loss"] == pytest.approx(whole["loss"], rel=1e-12)  # the same rows: the whole epoch's mean

    # a stop before any new step leaves the run state as it was
    state = RunState(partial={"steps": 2, "loss_sum": 2.0, "losses": 2, "samples": 8, "time_s": 1.0, "seen": [1]})
    before = dict(state.partial)
    assert train_epoch(FakeEngine(), batches(order), cfg, state, ctx, lambda: True) is None
    assert state.partial == before and state.global_step == 0


def test_unseen_batches_skip_trained_rows_and_fill_from_spare_ones():
    from refseg.train.epoch import unseen_batches

    order = [5, 0, 9, 3, 7, 1, 8, 2, 6, 4, 11, 10]
    seen = [0, 1, 2, 3, 4, 5]

    def ids(out) -> list[list[int]]:
        return [b["ref_id"].tolist() for b in out]

    assert ids(unseen_batches(batches(order), seen, 4, spare=0)) == [[9, 7, 8, 6]]  # [11, 10] make no batch
    # a rank short of new rows fills its last batches with up to `spare` of the rows it passed over
    assert ids(unseen_batches(batches(order), seen, 4, spare=2)) == [[9, 7, 8, 6], [11, 10, 5, 0]]
    assert ids(unseen_batches(batches(order), [], 3, spare=4)) == [[5, 0, 9], [3, 7, 1], [8, 2, 6], [4, 11, 10]]
    first = next(unseen_batches(batches(order), seen, 4, spare=0))
    assert first["image"].shape == (4, 3, 8, 8) and first["image"][0, 0, 0, 0] == pytest.approx(9 / 40 - 0.5)


def test_a_signal_sets_the_request_once_and_a_second_one_aborts():
    from refseg.train.stop import StopRequest, StopWatch

    previous = signal.getsignal(signal.SIGINT)
    with StopRequest(local=True) as stop:
        watch = StopWatch(stop.name)
        assert not watch.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs in this thread at the next bytecode
        assert stop.signum == signal.SIGTERM and watch.requested()
        with pytest.raises(KeyboardInterrupt):  # the previous handler is back: Ctrl-C now aborts
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is previous
    assert not StopWatch(None).requested()


def test_the_stop_sentence_names_where_and_the_exact_resume_command():
    from refseg.cli import build_parser
    from refseg.cli.train import stopped_sentence

    a = build_parser().parse_args(["train", "--config", "configs/debug.yaml", "--output-dir", "runs/my run",
                                   "--local", "train.lr=1e-3", "data.root=/data/ref coco"])
    inside = {"signal": "SIGINT", "epochs_done": 1, "step": 20, "epoch_steps": 8}
    assert stopped_sentence(a, "runs/my run", inside, 12) == (
        "stopped by SIGINT in epoch 2 after step 20 (8 of its 12 steps) and saved a checkpoint; continue with: "
        "refseg train --config configs/debug.yaml --output-dir 'runs/my run' --resume --local train.lr=1e-3 "
        "'data.root=/data/ref coco'")
    between = {"signal": "SIGTERM", "epochs_done": 2, "step": 24, "epoch_steps": 0}
    assert stopped_sentence(a, "runs/my run", between, 12).startswith("stopped by SIGTERM after epoch 2 (step 24) and")
    start = {"signal": "SIGINT", "epochs_done": 0, "step": 0, "epoch_steps": 0}
    assert stopped_sentence(a, "runs/my run", start, 12).startswith("stopped by SIGINT before its first step and")
