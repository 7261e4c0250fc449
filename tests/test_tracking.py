"""Tracking and progress: a run's metrics in MLflow and TensorBoard equal its metrics.jsonl; metrics.jsonl
and curves.png exist while the run is still going; batch jobs print progress lines with rate and ETA.

The training test reads the metrics back the way a user would: MLflow's client API on the run's store
(found by its ``refseg.run`` tag) and TensorBoard's own event reader.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import threading
import time
from pathlib import Path

import pytest

from refseg.config import ConfigError, load_config
from refseg.config.validate import validate_tracking
from refseg.progress import Progress
from refseg.train.tracking import check_trackers

REPO = Path(__file__).resolve().parents[1]
PIPE_LINE = re.compile(r"^\[refseg\] (\w+) (\d+)/(\d+) (\w+) \((\d+)%\) (\d+\.\d) (\w+)/s (ETA \d+s|in \d+s)$")


def watch_first_metrics(out: Path, done: threading.Event, seen: list[dict]) -> None:
    """Poll ``out`` until ``done``; append to ``seen`` the first metrics.jsonl text found, with whether
    curves.png and summary.json (written after fit()) existed at that moment."""
    while not done.is_set() and not seen:
        try:
            text = (out / "metrics.jsonl").read_text()
        except FileNotFoundError:
            time.sleep(0.05)
            continue
        seen.append({"text": text, "curves": (out / "curves.png").is_file(), "summary": (out / "summary.json").exists()})


@pytest.mark.slow
def test_two_epochs_in_mlflow_and_tensorboard_equal_metrics_jsonl(ray_session, synthetic_root, tmp_path):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    from refseg.train import run_training
    from refseg.train.tracking import find_mlflow_run

    cfg = load_config(REPO / "configs" / "debug.yaml", [
        f"data.root={synthetic_root}", "data.synthetic=false", "data.image_size=64", "data.augment=false",
        "train.epochs=2", "train.time_budget_s=null", "train.batch_size=4", "train.max_steps_per_epoch=3",
        "train.num_workers=1", "train.warmup_steps=0", "train.val_every=1", "train.checkpoint_every=1",
        "train.log_every=1", "train.tracking=[mlflow,tensorboard]", "eval.batch_size=16"])
    out = tmp_path / "tracked"
    seen, done = [], threading.Event()
    watcher = threading.Thread(target=watch_first_metrics, args=(out, done, seen), daemon=True)
    watcher.start()
    try:
        summary = run_training(cfg, out)
    finally:
        done.set()
        watcher.join()
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2] and summary["steps"] == 6
    # epoch 1's line and curves were on disk while the run went on (before fit() returned)
    assert seen == [{"text": json.dumps(hist[0]) + "\n", "curves": True, "summary": False}]

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    run_id = find_mlflow_run(client, json.loads((out / "run.json").read_text())["name"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.preset"] == "tiny"
    acc = EventAccumulator(str(out / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    keys = [k for k, v in hist[0].items() if isinstance(v, (int, float))]
    assert {"loss", "lr", "val_oiou", "val_miou", "epoch", "step"} <= set(keys)
    for key in keys:
        expected = [(h["step"], float(h[key])) for h in hist]
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert logged == expected, key
        events = [(e.step, make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(key)]
        assert events == expected, key
    # every optimizer step: step/loss, step/samples_per_s and step/lr (the epoch's lr at its last step)
    step_lr = {m.step: m.value for m in client.get_metric_history(run_id, "step/lr")}
    assert sorted(step_lr) == [1, 2, 3, 4, 5, 6]
    assert [step_lr[h["step"]] for h in hist] == [h["lr"] for h in hist]
    assert [e.step for e in acc.Tensors("step/loss")] == [1, 2, 3, 4, 5, 6]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"curves.png", "metrics.jsonl", "summary.json"} <= artifacts


def test_tracker_names_and_packages_are_checked_in_one_sentence():
    with pytest.raises(ConfigError, match=r"^train.tracking: 'neptune' is not one of mlflow \| tensorboard \| wandb$"):
        validate_tracking(["mlflow", "neptune"])
    with pytest.raises(ConfigError, match="lists a tracker twice"):
        validate_tracking(["tensorboard", "tensorboard"])
    validate_tracking(["mlflow", "tensorboard", "wandb"])
    check_trackers(["mlflow", "tensorboard"])  # both installed by refseg[test]
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match=r"'wandb' needs the Python package 'wandb', which is not installed"):
            check_trackers(["wandb"])


def test_progress_on_a_pipe_prints_rate_and_eta_lines():
    stream = io.StringIO()
    with Progress("segment", total=10, unit="images", stream=stream, every_s=0.0) as bar:
        for _ in range(5):
            time.sleep(0.01)
            bar.update(2)
    lines = stream.getvalue().splitlines()
    parsed = [PIPE_LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [(m[1], int(m[2]), int(m[3]), m[4], int(m[5])) for m in parsed] == [
        ("segment", n, 10, "images", 10 * n) for n in (2, 4, 6, 8, 10)]
    assert [m[8].split()[0] for m in parsed] == ["ETA"] * 4 + ["in"]
    assert all(m[7] == "images" and float(m[6]) > 0 for m in parsed)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_redraws_one_bar():
    stream = FakeTerminal()
    with Progress("evaluate", total=4, unit="samples", stream=stream, every_s=0.0) as bar:
        bar.update(1)
        bar.update(3)
    text = stream.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1  # one line, redrawn in place
    frames = text.strip("\n").split("\r")[1:]
    assert frames[0].startswith("[refseg] evaluate [######..................] 1/4 samples 25% ")
    assert frames[-1].startswith("[refseg] evaluate [########################] 4/4 samples 100% ")


def test_evaluate_prints_progress_lines(ray_session, synthetic_root, tmp_path, tmp_path_factory, capsys):
    """`refseg evaluate` with stderr not a terminal: lines with the count, rate and ETA, the last one the total."""
    from test_predictor import tiny_checkpoint

    from refseg.cli import main

    ckpt = tiny_checkpoint(tmp_path_factory)
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--data-root", str(synthetic_root), "--dataset", "refcoco",
               "--split-by", "unc", "--split", "val", "--workers", "1", "--batch-size", "8",
               "--output", str(tmp_path / "eval")])
    assert rc == 0
    samples = json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_samples"]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[refseg] evaluate")]
    parsed = [PIPE_LINE.match(line) for line in lines]
    assert lines and all(parsed), lines
    assert parsed[-1][8].startswith("in ") and int(parsed[-1][2]) == int(parsed[-1][3]) == samples


def test_sweep_logs_trials_through_tune_callbacks_into_the_sweep_dir(tmp_path, monkeypatch):
    """A sweep with train.tracking [mlflow]: Ray Tune's MLflowLoggerCallback on the sweep's own store, whose
    experiment keeps its artifacts under DIR (not in the working directory)."""
    from mlflow import MlflowClient
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from refseg.sweep.run import SWEEP_EXPERIMENT, tracking_callbacks

    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "debug.yaml", ["train.tracking=[mlflow,tensorboard]"])
    (callback,) = tracking_callbacks(cfg, str(tmp_path / "sweep"))
    uri = f"sqlite:///{tmp_path / 'sweep' / 'mlflow' / 'mlflow.db'}"
    assert isinstance(callback, MLflowLoggerCallback) and callback.tracking_uri == uri
    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(SWEEP_EXPERIMENT)
    assert experiment.artifact_location == (tmp_path / "sweep" / "mlflow" / "artifacts").as_uri()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
