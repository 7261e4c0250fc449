"""The default console: refseg's lines and the warnings a user must act on, nothing of Ray's; ``-v`` shows
Ray's. Each command runs as a subprocess while this session's Ray instance (the ``ray_session`` fixture)
is up, so another Ray instance runs on the host -- where Ray Train's placement-group cleaner used to die
with "Found multiple active Ray instances".
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_predictor import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
RAY_LINES = ("Started a local Ray instance", "Starting execution of Dataset")
NOISE = (*RAY_LINES, "Traceback", "Found multiple active Ray instances", "Token authentication is enabled",
         "Execution plan of Dataset", "Progress bars disabled", "logging_progress")


def run_refseg(args: list[str]) -> str:
    """stdout + stderr of a successful ``refseg ARGS`` (a fresh local Ray instance of its own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}  # Ray's defaults
    with tempfile.TemporaryDirectory(prefix="rt") as ray_tmp:  # short: Ray's socket paths have a length limit
        r = subprocess.run([sys.executable, "-m", "refseg.cli", *args], capture_output=True, text=True, cwd=REPO,
                           env={**env, "RAY_TMPDIR": ray_tmp}, timeout=1200, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def evaluate_args(ray_session, synthetic_root, tmp_path_factory) -> list[str]:
    ckpt = tiny_checkpoint(tmp_path_factory)
    return ["evaluate", "--checkpoint", str(ckpt), "--data-root", str(synthetic_root), "--batch-size", "16"]


@pytest.mark.slow
def test_evaluate_prints_refseg_lines_only_and_ray_lines_with_v(evaluate_args, tmp_path):
    quiet = run_refseg([*evaluate_args, "--output", str(tmp_path / "quiet")])
    assert [n for n in NOISE if n in quiet] == [], quiet[-4000:]
    assert "val: oIoU" in quiet and "wrote" in quiet

    loud = run_refseg(["-v", *evaluate_args, "--output", str(tmp_path / "loud")])
    assert all(n in loud for n in RAY_LINES), loud[-4000:]
    assert "Traceback" not in loud


@pytest.mark.slow
def test_train_beside_another_ray_instance_has_no_cleaner_traceback(ray_session, synthetic_root, tmp_path):
    out = run_refseg([
        "train", "--config", "debug", "--output-dir", str(tmp_path / "run"), f"data.root={synthetic_root}",
        "data.synthetic=false", "data.image_size=64", "data.augment=false", "train.time_budget_s=null",
        "train.epochs=2", "train.batch_size=4", "train.max_steps_per_epoch=4", "train.warmup_steps=0",
        "train.val_every=2", "train.checkpoint_every=2", "eval.batch_size=16",
    ])
    assert [n for n in NOISE if n in out] == [], out[-4000:]
    assert (tmp_path / "run" / "model.pt").is_file()
