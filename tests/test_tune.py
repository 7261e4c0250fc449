"""Sweeps: search-space parsing, concurrency sizing, sweep outputs, and real Tune sweeps of DeepSpeed runs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from refseg.config import ConfigError, load_yaml
from refseg.sweep import (
    SweepState,
    load_space,
    max_concurrent_trials,
    parse_space,
    per_trial_resources,
    trial_config,
    tune_domains,
    write_sweep_outputs,
)

REPO = Path(__file__).resolve().parents[1]
DEBUG = load_yaml(REPO / "configs" / "debug.yaml")
SPACE = REPO / "tune" / "fusion_lr.yaml"


def sweep_state(tmp_path: Path, **kw) -> SweepState:
    """A SweepState over the debug config in ``tmp_path`` (fields not given take neutral values)."""
    fields = {"base": DEBUG, "space": {}, "output_dir": str(tmp_path), "experiment_path": str(tmp_path / "tune"),
              "metric": "val_oiou", "mode": "max", "num_samples": 1, "max_concurrent": 1, "per_trial": {},
              "scheduler": "asha"}
    return SweepState(**{**fields, **kw})


# ----------------------------------------------------------------------------- the space
def test_shipped_space_parses_and_samples_within_bounds():
    space = load_space(SPACE, DEBUG)
    assert space == {"model.fusion.num_layers": ("choice", [1, 2, 3, 4, 5, 6]),
                     "train.lr": ("loguniform", [1e-5, 1e-3])}
    domains = tune_domains(space)
    rng = np.random.default_rng(0)
    layers = domains["model.fusion.num_layers"].sample(size=200, random_state=rng)
    lrs = np.array(domains["train.lr"].sample(size=200, random_state=rng))
    assert set(layers) == {1, 2, 3, 4, 5, 6}
    assert lrs.min() >= 1e-5 and lrs.max() <= 1e-3
    assert np.median(np.log10(lrs)) == pytest.approx(-4, abs=0.3)  # log-uniform, not uniform (median ~5e-4)


def test_randint_upper_bound_is_inclusive_and_uniform_floats():
    space = parse_space({"train.epochs": {"randint": [2, 4]}, "train.weight_decay": {"uniform": [0, 0.1]}}, DEBUG)
    rng = np.random.default_rng(0)
    d = tune_domains(space)
    assert set(d["train.epochs"].sample(size=100, random_state=rng)) == {2, 3, 4}
    wd = np.array(d["train.weight_decay"].sample(size=100, random_state=rng))
    assert 0 <= wd.min() and wd.max() <= 0.1


def test_yaml_exponent_strings_become_floats(tmp_path):
    (tmp_path / "s.yaml").write_text("train.lr:\n  loguniform: [1e-5, 1e-3]\n")  # PyYAML reads '1e-5' as str
    assert load_space(tmp_path / "s.yaml", DEBUG)["train.lr"] == ("loguniform", [1e-5, 1e-3])


@pytest.mark.parametrize("key, fragment", [
    ("model.fusion.num_layer", "did you mean 'num_layers'"),
    ("modle.fusion.num_layers", "did you mean 'model'"),
    ("train.learning_rate", "unknown config key 'train.learning_rate'"),
    ("train.lr.value", "unknown config key 'train.lr.value'"),
])
def test_unknown_keys_are_errors_naming_the_key(key, fragment):
    with pytest.raises(ConfigError) as e:
        parse_space({key: {"choice": [1, 2]}}, DEBUG, where="'s.yaml'")
    assert fragment in str(e.value) and key in str(e.value) and "'s.yaml'" in str(e.value)


def test_sections_and_sweep_keys_cannot_be_searched():
    with pytest.raises(ConfigError, match="'model.fusion' is a config section"):
        parse_space({"model.fusion": {"choice": [1]}}, DEBUG)
    with pytest.raises(ConfigError, match="'tune.grace_period' configures the sweep"):
        parse_space({"tune.grace_period": {"choice": [1, 2]}}, DEBUG)


@pytest.mark.parametrize("spec, fragment", [
    (3e-4, "must map to exactly one of"),
    ({"normal": [0, 1]}, "must map to exactly one of"),
    ({"choice": [1], "uniform": [0, 1]}, "must map to exactly one of"),
    ({"choice": []}, "non-empty list"),
    ({"uniform": [1e-4]}, "two numbers [lo, hi]"),
    ({"uniform": [1e-3, 1e-4]}, "needs lo < hi"),
    ({"loguniform": [0, 1e-3]}, "needs lo > 0"),
    ({"randint": [1, 2.5]}, "needs integers"),
])
def test_malformed_distributions_are_errors(spec, fragment):
    with pytest.raises(ConfigError) as e:
        parse_space({"train.lr": spec}, DEBUG)
    assert fragment in str(e.value) and "train.lr" in str(e.value)


def test_values_are_checked_against_the_key_type():
    with pytest.raises(ConfigError, match=r"model.fusion.num_layers.*expects an integer"):
        parse_space({"model.fusion.num_layers": {"loguniform": [1, 6]}}, DEBUG)
    with pytest.raises(ConfigError, match=r"value 3 for 'train.precision'.*expects a string"):
        parse_space({"train.precision": {"choice": ["bf16", 3]}}, DEBUG)
    with pytest.raises(ConfigError, match="empty"):
        parse_space({}, DEBUG)


def test_trial_config_applies_sampled_values_over_the_preset():
    cfg = trial_config(DEBUG, {"model.fusion.num_layers": np.int64(5), "train.lr": np.float64(2e-4),
                               "model.decoder.channels": np.array([8, 8, 8, 8])})
    assert cfg.model.fusion.num_layers == 5 and type(cfg.model.fusion.num_layers) is int
    assert cfg.train.lr == 2e-4 and cfg.model.decoder.channels == [8, 8, 8, 8]
    assert cfg.model.vision.backbone == "tiny"  # the rest of the tiny preset is untouched
    assert DEBUG["model"] == {"preset": "tiny"}  # the base dict is not mutated


# ----------------------------------------------------------------------------- resources
def test_concurrency_leaves_room_for_the_data_pipeline():
    base = trial_config(DEBUG, {}).to_dict()
    one = {**base, "train": {**base["train"], "num_workers": 1, "cpus_per_worker": 0.5}}
    need = per_trial_resources(one, {})
    assert need == {"CPU": pytest.approx(0.6), "GPU": 0.0, "data_CPU": 0.5}
    assert max_concurrent_trials(need, {"CPU": 2.0}) == 2  # 2 x 0.6 held + 0.5 for a data task <= 2
    assert max_concurrent_trials(need, {"CPU": 2.0}, requested=1) == 1
    with pytest.raises(ConfigError, match="would hang; use at most 2"):
        max_concurrent_trials(need, {"CPU": 2.0}, requested=3)
    # the debug config itself (2 workers x 0.5 CPU): one trial at a time on 2 CPUs
    assert max_concurrent_trials(per_trial_resources(DEBUG, {}), {"CPU": 2.0}) == 1
    two_full = {**base, "train": {**base["train"], "num_workers": 2, "cpus_per_worker": 1.0}}
    with pytest.raises(ConfigError, match="needs 2.1 CPUs"):
        max_concurrent_trials(per_trial_resources(two_full, {}), {"CPU": 2.0})


def test_concurrency_uses_the_largest_searched_resources_and_gpus():
    space = parse_space({"train.num_workers": {"choice": [1, 4]}}, DEBUG)
    assert per_trial_resources(DEBUG, space)["CPU"] == pytest.approx(0.1 + 4 * 0.5)
    gpu = trial_config(DEBUG, {"train.use_gpu": True, "train.num_workers": 4}).to_dict()
    need = per_trial_resources(gpu, {})
    assert need["GPU"] == 4.0
    assert max_concurrent_trials(need, {"CPU": 128.0, "GPU": 8.0}) == 2  # the guide's 8 GPUs / 4 per trial


@pytest.mark.slow
@pytest.mark.parametrize("search", ["random", "optuna"])
def test_tuner_runs_at_most_max_concurrent_trials(ray_session, tmp_path, search):
    """Tune silently ignores max_concurrent_trials for a BasicVariantGenerator instance; a sweep with too
    many trials at once starves Ray Data and hangs. Three 1.5 s trials, limit 2: never 3 at once."""
    from ray import tune

    from refseg.sweep import TRIAL_CPUS, make_tuner

    log_dir = tmp_path / "spans"
    log_dir.mkdir()

    def trainable(config):
        import time as _t
        import uuid

        import ray.tune as rt

        start = _t.time()
        _t.sleep(1.5)
        (log_dir / uuid.uuid4().hex).write_text(f"{start} {_t.time()}")
        rt.report({"epoch": 1, "val_oiou": config["train.lr"]})

    cfg = trial_config(DEBUG, {"tune.search": search, "train.epochs": 1})
    space = parse_space({"train.lr": {"loguniform": [1e-5, 1e-3]}}, DEBUG)
    state = sweep_state(tmp_path, num_samples=3, max_concurrent=2)
    make_tuner(tune.with_resources(trainable, {"CPU": TRIAL_CPUS}), space, cfg, state).fit()
    spans = [tuple(map(float, p.read_text().split())) for p in log_dir.iterdir()]
    assert len(spans) == 3
    most = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    # the property: never more than the limit at once (how many overlap below it depends on machine load)
    assert 1 <= most <= 2, spans


# ----------------------------------------------------------------------------- outputs
def _record(tid, params, vals, status):
    hist = [{"epoch": i + 1, "val_oiou": v, "val_miou": v / 2, "checkpoint_path": f"/ck/{tid}/{i}"}
            for i, v in enumerate(vals)]
    return {"trial_id": tid, "params": params, "status": status, "history": hist, "error": None,
            "trial_dir": f"/nonexistent/{tid}"}


def test_sweep_outputs_from_trial_records(tmp_path):
    state = sweep_state(tmp_path, space={"model.fusion.num_layers": {"choice": [1, 2, 3]}, "train.lr": {}})
    records = [
        _record("a_0", {"model.fusion.num_layers": 1, "train.lr": 1e-4}, [0.2, 0.3], "completed"),
        _record("a_1", {"model.fusion.num_layers": 3, "train.lr": 5e-4}, [0.4, 0.6], "completed"),
        _record("a_2", {"model.fusion.num_layers": 2, "train.lr": 2e-5}, [0.1], "early_stopped"),
        {**_record("a_3", {"model.fusion.num_layers": 2, "train.lr": 3e-5}, [], "error"), "error": "boom"},
    ]
    summary = write_sweep_outputs(tmp_path, state, records=records)
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert [r["trial_id"] for r in rows] == ["a_0", "a_1", "a_2", "a_3"]
    assert [r["status"] for r in rows] == ["completed", "completed", "early_stopped", "error"]
    assert [r["epochs_run"] for r in rows] == ["2", "2", "1", "0"]
    assert rows[1]["best_val_oiou"] == "0.6" and rows[1]["best_val_miou"] == "0.3" and rows[1]["best_epoch"] == "2"
    assert rows[3]["error"] == "boom" and rows[3]["best_val_oiou"] == ""
    assert summary["best"]["trial_id"] == "a_1" and summary["best"]["value"] == 0.6
    assert summary["best"]["checkpoint_path"] == "/ck/a_1/1" and summary["best"]["model_path"] is None
    assert summary["statuses"] == {"completed": 2, "early_stopped": 1, "error": 1}
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best == trial_config(DEBUG, records[1]["params"]).to_dict()
    assert (tmp_path / "trials.png").stat().st_size > 1000
    state.mode = "min"
    assert write_sweep_outputs(tmp_path, state, records=records)["best"]["trial_id"] == "a_2"


def test_cli_reports_space_errors_before_starting_ray(tmp_path, capsys):
    import ray

    from refseg.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model.fusion.num_layer: {choice: [1, 2]}\n")
    started = ray.is_initialized()
    assert main(["tune", "--config", "debug", "--space", str(bad), "--output-dir", str(tmp_path / "o")]) == 2
    assert "did you mean 'num_layers'" in capsys.readouterr().err
    assert main(["tune", "--resume", str(tmp_path / "nothing")]) == 2
    assert "holds no sweep.json" in capsys.readouterr().err
    assert main(["tune", "--resume", str(tmp_path), "--config", "debug"]) == 2
    assert main(["tune", "--config", "debug", "--space", str(SPACE), "--num-samples", "0",
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert "--num-samples / tune.num_samples must be at least 1" in capsys.readouterr().err
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "sweep.json").write_text("{}")
    assert main(["tune", "--config", "debug", "--space", str(SPACE), "--output-dir", str(tmp_path / "old")]) == 2
    assert "already holds a sweep; pass --resume" in capsys.readouterr().err
    assert ray.is_initialized() == started and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- real sweeps
def sweep_overrides(root: Path) -> list[str]:
    return [f"data.root={root}", "data.synthetic=false", "data.image_size=64", "train.num_workers=1",
            "train.epochs=2", "train.batch_size=4", "train.max_steps_per_epoch=3", "train.precision=fp32",
            "train.cpus_per_worker=0.5", "train.val_every=1", "train.checkpoint_every=1", "eval.batch_size=16"]


def read_rows(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "trials.csv").open()))


@pytest.mark.slow
def test_three_trials_rows_best_config_and_statuses(ray_session, synthetic_root, tmp_path):
    from refseg.cli import main

    out = tmp_path / "sweep"
    free = ray_session.available_resources().get("CPU", 0.0)
    t0 = time.time()
    assert main(["tune", "--config", "debug", "--space", str(SPACE), "--num-samples", "3",
                 "--output-dir", str(out), *sweep_overrides(synthetic_root)]) == 0
    print(f"3-trial sweep: {time.time() - t0:.0f}s")
    rows = read_rows(out)
    assert len(rows) == 3
    params = {(r["model.fusion.num_layers"], r["train.lr"]) for r in rows}
    assert len(params) == 3  # distinct samples
    assert {r["status"] for r in rows} <= {"completed", "early_stopped"}, rows
    for r in rows:
        tdir = Path(r["trial_dir"])
        assert tdir == out / "trials" / r["trial_id"]
        cfg = yaml.safe_load((tdir / "config.yaml").read_text())
        assert cfg["model"]["fusion"]["num_layers"] == int(r["model.fusion.num_layers"])
        assert cfg["train"]["lr"] == pytest.approx(float(r["train.lr"]))
        if r["status"] == "completed":
            assert r["epochs_run"] == "2" and (tdir / "model.pt").is_file() and (tdir / "summary.json").is_file()
            # the row's best scores are the trial's own validation history (what its training wrote)
            history = [json.loads(line) for line in (tdir / "metrics.jsonl").read_text().splitlines()]
            best = max((h for h in history if "val_oiou" in h), key=lambda h: h["val_oiou"])
            assert float(r["best_val_oiou"]) == best["val_oiou"] and int(r["best_epoch"]) == best["epoch"]
            assert float(r["best_val_miou"]) == max(h["val_miou"] for h in history if "val_miou" in h)
        else:  # ASHA stopped it after its grace period (1 epoch)
            assert r["epochs_run"] == "1" and not (tdir / "summary.json").exists()
    best_row = max(rows, key=lambda r: float(r["best_val_oiou"]))
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["model"]["fusion"]["num_layers"] == int(best_row["model.fusion.num_layers"])
    assert best["train"]["lr"] == pytest.approx(float(best_row["train.lr"]))
    assert best == yaml.safe_load((Path(best_row["trial_dir"]) / "config.yaml").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["trial_id"] == best_row["trial_id"]
    assert summary["best"]["value"] == pytest.approx(float(best_row["best_val_oiou"]))
    assert summary["best"]["checkpoint_path"]
    if best_row["status"] == "completed":
        assert summary["best"]["model_path"] == str(Path(best_row["trial_dir"]) / "model.pt")
    assert (out / "trials.png").stat().st_size > 1000
    # trials stopped by ASHA ended their own Train runs: no workers' CPUs left behind for the next sweep
    deadline = time.time() + 60
    while ray_session.available_resources().get("CPU", 0.0) < free - 1e-6 and time.time() < deadline:
        time.sleep(1)
    assert ray_session.available_resources().get("CPU", 0.0) >= free - 1e-6


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_session, synthetic_root, tmp_path):
    from refseg.cli import main

    out = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "refseg.cli", "tune", "--config", "debug", "--space", str(SPACE),
           "--num-samples", "2", "--max-concurrent", "1", "--output-dir", str(out),
           *sweep_overrides(synthetic_root), "tune.scheduler=none"]
    t0 = time.time()
    log = (tmp_path / "tune.log").open("w")  # a file, not a pipe: Tune's progress would fill a pipe and block
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:  # interrupt (Ctrl+C) once one trial finished and the other saved its epoch-1 checkpoint
        while not (list(out.glob("trials/*/summary.json")) and list(out.glob("trials/*/ray/*/checkpoint_*"))
                   and len({p.parts[-4] for p in out.glob("trials/*/ray/*/checkpoint_*")}) == 2):
            assert proc.poll() is None, (tmp_path / "tune.log").read_text()[-3000:]
            assert time.time() - t0 < 400, "the sweep made no progress in 400 s"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130  # "sweep interrupted; continue it with: refseg tune --resume"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert f"refseg tune --resume {out}" in (tmp_path / "tune.log").read_text()
    print(f"interrupted after {time.time() - t0:.0f}s")
    finished = {p.parent.name: (p.parent / "config.yaml").stat().st_mtime_ns for p in out.glob("trials/*/summary.json")}
    assert len(finished) == 1

    t1 = time.time()
    assert main(["tune", "--resume", str(out)]) == 0
    print(f"resume: {time.time() - t1:.0f}s")
    rows = read_rows(out)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}, rows
    assert len({r["trial_id"] for r in rows}) == 2
    for tid, mtime in finished.items():  # the finished trial was not started again
        assert (out / "trials" / tid / "config.yaml").stat().st_mtime_ns == mtime
    assert sorted(p.parent.name for p in out.glob("trials/*/model.pt")) == sorted(r["trial_id"] for r in rows)
