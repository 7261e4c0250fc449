"""Files a user hands to refseg are read without running pickled code, and DeepSpeed checkpoints of every
ZeRO stage consolidate to exactly what DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint`` gives.

Crafted payloads (a pickle whose ``__reduce__`` runs ``touch MARKER`` through ``os.system``) sit in a
model.pt, a ZeRO-0 and a ZeRO-2 checkpoint dir, a refs pickle and a Parquet manifest: each is refused with
one sentence (or, for Parquet, never unpickled) and the marker file never appears. Parity checkpoints are
written by real DeepSpeed engines in a subprocess (one rank; two ranks in the slow test).
"""

from __future__ import annotations

import os
import pickle
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refseg.config import Config, ConfigError
from refseg.train.zero_reader import CheckpointError, fp32_state_dict

ADVICE = "convert it with DeepSpeed's zero_to_fp32.py on a machine you trust"
SYSTEM = f"{os.system.__module__}.system"  # how pickle names os.system (posix.system on Linux)


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def refused_message(path: Path) -> str:
    return (f"checkpoint file '{path}' contains pickled objects other than tensors ({SYSTEM}); refseg will not "
            f"unpickle it; {ADVICE}")


def test_the_payload_runs_code_when_unpickled_plainly(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker), protocol=2))
    assert marker.exists()  # so its absence below means nothing ran


def crafted_zero_dir(root: Path, marker: Path, stage: int) -> Path:
    """A checkpoint dir (config.yaml + ckpt/) whose ZeRO-0 model states or ZeRO-2 optimizer shard holds the
    payload; the other files look like DeepSpeed's."""
    root.mkdir()
    (root / "config.yaml").write_text(Config().to_yaml())
    tag = root / "ckpt"
    tag.mkdir()
    weight = torch.zeros(3)
    module = {"module": {"w": weight}, "buffer_names": [], "param_shapes": [{"w": torch.Size([3])}],
              "shared_params": {}, "frozen_param_shapes": None, "ds_version": "0.19.8"}
    if stage == 0:
        torch.save({**module, "optimizer": {"evil": Payload(marker)}}, tag / "mp_rank_00_model_states.pt")
        return tag / "mp_rank_00_model_states.pt"
    torch.save(module, tag / "mp_rank_00_model_states.pt")
    optim = {"zero_stage": 2, "partition_count": [1], "single_partition_of_fp32_groups": [weight],
             "loss_scaler": Payload(marker)}
    torch.save({"optimizer_state_dict": optim}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.mark.parametrize("stage", [0, 2])
def test_crafted_deepspeed_dir_is_refused_without_running_it(tmp_path, stage):
    from refseg.infer.predictor import Predictor

    marker = tmp_path / "ran"
    ckpt = tmp_path / f"zero{stage}"
    bad_file = crafted_zero_dir(ckpt, marker, stage)
    with pytest.raises(CheckpointError) as e:
        fp32_state_dict(ckpt, "ckpt")
    assert str(e.value) == refused_message(bad_file)
    with pytest.raises(ConfigError) as e:  # the documented entry point: Predictor.from_checkpoint(dir)
        Predictor.from_checkpoint(ckpt)
    assert str(e.value) == refused_message(bad_file)
    assert not marker.exists()


def test_crafted_deepspeed_dir_at_the_cli_is_one_sentence(ray_session, synthetic_root, tmp_path, capsys):
    from refseg.cli import main

    marker = tmp_path / "ran"
    bad_file = crafted_zero_dir(tmp_path / "ckpt_dir", marker, 0)
    rc = main(["evaluate", "--checkpoint", str(tmp_path / "ckpt_dir"), "--data-root", str(synthetic_root),
               "--output", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert f"refseg: error: {refused_message(bad_file)}\n" in err
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_protocol_4_payload_is_refused_too(tmp_path):
    """STACK_GLOBAL (pickle protocol 4) hides the global from the pre-scan; the weights-only load refuses it."""
    from refseg.train.zero_reader import load_checkpoint_file

    marker, path = tmp_path / "ran", tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "x": Payload(marker)}, path, pickle_protocol=4)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_file(path)
    assert str(e.value) == (f"checkpoint file '{path}' could not be read safely (UnpicklingError); it is damaged "
                            f"or not a DeepSpeed checkpoint file; {ADVICE}")
    assert not marker.exists()


def test_crafted_model_pt_is_refused_without_running_it(tmp_path):
    from refseg.infer.predictor import Predictor

    marker, path = tmp_path / "ran", tmp_path / "model.pt"
    torch.save({"model_config": {}, "state_dict": {}, "config": Payload(marker)}, path)
    with pytest.raises(ConfigError) as e:
        Predictor.from_checkpoint(path)
    assert str(e.value) == f"model file '{path}' could not be read (UnpicklingError); is it a refseg model.pt?"
    assert not marker.exists()


@pytest.mark.parametrize("form", ["torch zip", "plain pickle"])
def test_crafted_pickle_as_checkpoint_or_init_from_runs_nothing(tmp_path, capsys, form):
    """Every way a model file comes in -- --checkpoint of export / evaluate, Predictor.from_pretrained,
    train.init_from -- refuses a crafted pickle with one sentence and runs none of it."""
    from refseg.cli import main
    from refseg.infer.predictor import Predictor
    from refseg.train.init import read_init_weights

    marker, path = tmp_path / "ran", tmp_path / "model.pt"
    payload = {"model_config": {}, "state_dict": {}, "config": Payload(marker)}
    if form == "torch zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    unreadable = f"model file '{path}' could not be read (UnpicklingError); is it a refseg model.pt?"
    with pytest.raises(ConfigError) as e:
        Predictor.from_pretrained(path)
    assert str(e.value) == unreadable
    with pytest.raises(ConfigError) as e:
        read_init_weights(path)
    assert str(e.value) == f"train.init_from: {unreadable}"
    for argv in (["export", "--checkpoint", str(path), "--out", str(tmp_path / "artifact")],
                 ["evaluate", "--checkpoint", str(path), "--data-root", str(tmp_path), "--output", str(tmp_path / "e")],
                 ["train", "--config", "debug", "--output-dir", str(tmp_path / "run"), f"train.init_from={path}"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("refseg: error: ") and "Traceback" not in err, err
        assert str(path) in err and ("pickled objects other than tensors" in err or "could not be read" in err), err
    assert not marker.exists()
    assert not any((tmp_path / name).exists() for name in ("artifact", "e", "run"))


def test_crafted_refs_pickle_is_refused_without_running_it(tmp_path):
    from refseg.data.skips import RefSegDataError
    from refseg.data.sources.refer import read_refs

    marker, path = tmp_path / "ran", tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "sentences": Payload(marker)}], protocol=2))
    with pytest.raises(RefSegDataError) as e:
        read_refs(path)
    assert str(e.value) == (f"refs file {path} contains a pickled object of type {SYSTEM}; refusing to load it: "
                            "only plain lists/dicts/strings/ints are allowed")
    assert not marker.exists()


def test_parquet_manifest_with_a_pickled_extension_type_runs_nothing(tmp_path):
    """pyarrow's old pickle-based extension type ("arrow.py_extension_type") is read as its plain storage."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from refseg.data.sources.manifest import read_manifest

    marker, path = tmp_path / "ran", tmp_path / "manifest.parquet"
    ext = {b"ARROW:extension:name": b"arrow.py_extension_type",
           b"ARROW:extension:metadata": pickle.dumps(Payload(marker), protocol=2)}
    schema = pa.schema([pa.field("image", pa.string()), pa.field("text", pa.binary(), metadata=ext)])
    pq.write_table(pa.table({"image": ["a.jpg"], "text": [b"the cat"]}, schema=schema), path)
    read_manifest(path, check_files=False)
    assert not marker.exists()


# ----------------------------------------------------------------------------- parity with DeepSpeed
SAVE_SCRIPT = r'''
import contextlib, io, os, sys
import numpy as np, torch
from torch import nn
import deepspeed
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint


class Net(nn.Module):
    """Odd sizes (ZeRO padding), BatchNorm buffers, a frozen layer, a tied weight, two param groups."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.conv = nn.Conv2d(3, 7, 3)
        self.bn = nn.BatchNorm2d(7)
        self.frozen = nn.Linear(7, 3)
        self.head = nn.Linear(7, 5)
        self.out = nn.Linear(5, 11, bias=False)
        self.out.weight = self.emb.weight
        self.frozen.requires_grad_(False)

    def forward(self, image, ids):
        h = self.bn(self.conv(image)).mean((2, 3))  # (B, 7)
        return self.out(self.head(h) + self.emb(ids).mean(1)).square().mean() + self.frozen(h).sum()


deepspeed.init_distributed(dist_backend="gloo")
rank = int(os.environ["RANK"])
for run in sys.argv[2:]:
    stage, precision = run.split("-")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    model = Net().to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 1e-3}], lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "steps_per_print": 10**9,
              "zero_optimization": {"stage": int(stage)}, "bf16": {"enabled": precision == "bf16"}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    for _ in range(3):
        engine.backward(engine(torch.randn(2, 3, 8, 8, dtype=dtype), torch.randint(0, 11, (2, 4))))
        engine.step()
    out = os.path.join(sys.argv[1], f"zero{run}")
    history = [{"epoch": 1, "loss": np.float64(0.5), "val_oiou": np.float32(0.25)}]  # as refseg's client state
    engine.save_checkpoint(out, tag="ckpt", client_state={"refseg": {"epoch": 1, "history": history}})
    if rank == 0:
        if stage == "0":  # ZeRO-0: the module states, floating tensors as fp32
            module = torch.load(os.path.join(out, "ckpt", "mp_rank_00_model_states.pt"), weights_only=False)["module"]
            expected = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                expected = get_fp32_state_dict_from_zero_checkpoint(out, tag="ckpt")
        torch.save(dict(expected), os.path.join(out, "expected.pt"))
    torch.distributed.barrier()
'''
RUNS = [f"{stage}-{precision}" for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16")]
RUNS_2RANKS = ["2-bf16", "3-fp32"]


def save_checkpoints(out: Path, runs: list[str], world: int) -> Path:
    """Run SAVE_SCRIPT on ``world`` ranks (one process each); every run leaves out/zero<run>/."""
    from refseg.runtime import extensions_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = out / "save.py"
    script.write_text(SAVE_SCRIPT)
    procs = []
    for rank in range(world):
        env = {**os.environ, **extensions_env(), "DS_ACCELERATOR": "cpu", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(script), str(out), *runs], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return out


@pytest.fixture(scope="module")
def one_rank_checkpoints(tmp_path_factory) -> Path:
    return save_checkpoints(tmp_path_factory.mktemp("ds1"), RUNS, world=1)


def assert_same(mine: dict, expected: dict) -> None:
    assert list(mine) == list(expected)
    for k, v in expected.items():
        assert mine[k].dtype == v.dtype and mine[k].shape == v.shape and torch.equal(mine[k], v), k


@pytest.mark.parametrize("run", RUNS)
def test_reader_equals_deepspeed_one_rank(one_rank_checkpoints, run):
    ckpt = one_rank_checkpoints / f"zero{run}"
    expected = torch.load(ckpt / "expected.pt", weights_only=True)
    mine = fp32_state_dict(ckpt, "ckpt")
    assert_same(mine, expected)
    if not run.startswith("1-"):  # ZeRO-1 records no frozen parameters (nor does DeepSpeed return them)
        assert {"frozen.weight", "out.weight", "bn.running_mean"} <= set(mine)
    assert torch.equal(mine["out.weight"], mine["emb.weight"])  # the tied weight


@pytest.mark.slow
def test_reader_equals_deepspeed_two_ranks(tmp_path):
    out = save_checkpoints(tmp_path, RUNS_2RANKS, world=2)
    for run in RUNS_2RANKS:
        ckpt = out / f"zero{run}"
        assert len(list((ckpt / "ckpt").glob("*_optim_states.pt"))) == 2
        assert_same(fp32_state_dict(ckpt, "ckpt"), torch.load(ckpt / "expected.pt", weights_only=True))


def test_shard_count_unlike_the_world_size_is_one_sentence(one_rank_checkpoints, tmp_path):
    import shutil

    ckpt = shutil.copytree(one_rank_checkpoints / "zero2-fp32", tmp_path / "ckpt_dir")
    for f in (ckpt / "ckpt").glob("*_optim_states.pt"):
        shutil.copy(f, f.with_name(f.name.replace("rank_0", "rank_1")))
    with pytest.raises(CheckpointError) as e:
        fp32_state_dict(ckpt, "ckpt")
    assert str(e.value) == (f"checkpoint '{ckpt / 'ckpt'}' holds 2 *_optim_states.pt files but was saved with "
                            "world size 1; copy exactly that checkpoint's files, one per rank")
