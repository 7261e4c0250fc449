"""Checks that need no Ray run first: a bad checkpoint, data root or output path is one ``refseg: error:``
line, exit 2, no Ray session and nothing created.

The CLI runs as a subprocess with $RAY_TMPDIR (where Ray puts ``ray/session_*``) pointed at a fresh
folder: an empty folder afterwards means Ray was never started.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
from test_predictor import tiny_checkpoint

from refseg.config import Config, ConfigError
from refseg.infer.preflight import check_checkpoint, peek_torch_file
from refseg.io import check_output_dir, check_output_file

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


def run_cli(args: list[str], ray_tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "refseg.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120, check=False)


# ----------------------------------------------------------------------------- the checks themselves
def test_output_dir_check(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    check_output_dir(tmp_path, "--out")  # an existing dir
    check_output_dir(tmp_path / "new" / "deeper", "--out")  # can be created
    check_output_dir("s3://bucket/prefix", "--out")  # URIs are checked when written
    with pytest.raises(ConfigError) as e:
        check_output_dir(a_file, "--output-dir")
    assert str(e.value) == f"--output-dir {a_file} is a file; pass a directory (a new or an existing one)"
    with pytest.raises(ConfigError) as e:
        check_output_dir(a_file / "sub" / "dir", "--output")
    assert str(e.value) == (f"--output {a_file}/sub/dir is under {a_file}, which is a file; pass a path that is "
                            "not inside a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing created


def test_output_file_check(tmp_path):
    (tmp_path / "old.onnx").write_text("x")
    check_output_file(tmp_path / "old.onnx", "--out")  # replaced atomically
    check_output_file(tmp_path / "new" / "m.onnx", "--out")
    with pytest.raises(ConfigError, match=r"^--out .* is a directory; pass a file path inside it$"):
        check_output_file(tmp_path, "--out")
    with pytest.raises(ConfigError, match=r"is under .*old.onnx, which is a file"):
        check_output_file(tmp_path / "old.onnx" / "m.onnx", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.onnx"]


def test_peek_reads_structure_without_tensor_data(ckpt):
    import torch

    payload = peek_torch_file(ckpt)
    real = torch.load(ckpt, weights_only=True)
    assert set(payload) == set(real) and payload["model_config"] == real["model_config"]
    assert payload["config"] == real["config"] and list(payload["state_dict"]) == list(real["state_dict"])
    check_checkpoint(ckpt)
    check_checkpoint(ckpt.parent)  # a dir holding model.pt


def test_deepspeed_dir_is_checked_cheaply(tmp_path):
    import torch

    ds = tmp_path / "ds"
    (ds / "ckpt").mkdir(parents=True)
    (ds / "config.yaml").write_text(Config().to_yaml())
    with pytest.raises(ConfigError, match="holds no DeepSpeed model states"):
        check_checkpoint(ds)
    torch.save({"module": {"w": torch.zeros(2)}}, ds / "ckpt" / "mp_rank_00_model_states.pt")
    check_checkpoint(ds)
    (ds / "config.yaml").write_text("model: {preset: nope}\n")
    with pytest.raises(ConfigError, match="config.yaml is not a valid refseg config"):
        check_checkpoint(ds)


def test_bad_model_files_are_one_sentence(tmp_path):
    import torch

    marker = tmp_path / "ran"
    cases = {
        "empty.pt": b"",
        "junk.pt": b"not a checkpoint",
        "pickle.pt": pickle.dumps({"model_config": {}, "state_dict": {}}),  # a plain pickle, not a torch zip
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError) as e:
            check_checkpoint(tmp_path / name)
        assert str(e.value) == f"model file '{tmp_path / name}' could not be read (BadZipFile); is it a refseg model.pt?"
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ConfigError, match=r"is not a refseg model.pt \(missing model_config/state_dict\)"):
        check_checkpoint(tmp_path / "foreign.pt")
    torch.save({"model_config": {"preset": "nope"}, "state_dict": {}}, tmp_path / "badcfg.pt")
    with pytest.raises(ConfigError, match="holds an invalid model config"):
        check_checkpoint(tmp_path / "badcfg.pt")
    for protocol in (2, 4):  # GLOBAL and STACK_GLOBAL
        path = tmp_path / f"crafted{protocol}.pt"
        torch.save({"model_config": {}, "state_dict": {}, "config": Payload(marker)}, path, pickle_protocol=protocol)
        with pytest.raises(ConfigError) as e:
            check_checkpoint(path)
        assert str(e.value) == (f"model file '{path}' contains pickled objects other than tensors "
                                f"({os.system.__module__}.system); refseg will not unpickle it")
    with zipfile.ZipFile(tmp_path / "nopkl.pt", "w") as z:
        z.writestr("archive/version", "3")
    with pytest.raises(ConfigError, match="could not be read"):
        check_checkpoint(tmp_path / "nopkl.pt")
    assert not marker.exists()


# ----------------------------------------------------------------------------- the real CLI, before Ray
@pytest.fixture(scope="module")
def files(ckpt, synthetic_root, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    (d / "junk.pt").write_bytes(b"\x00" * 64)
    (d / "empty.pt").write_bytes(b"")
    (d / "afile").write_text("x")
    (d / "rows.jsonl").write_text('{"id": "a", "image": "a.png", "text": "the dog"}\n')
    (d / "art").mkdir()  # an artifact folder whose weights file is cut short
    (d / "art" / "config.json").write_text(json.dumps({"format": "refseg", "model_config": {"preset": "tiny"}}))
    (d / "art" / "model.safetensors").write_bytes((1000).to_bytes(8, "little") + b"{}")
    return {"ckpt": ckpt, "root": synthetic_root, "dir": d}


CASES = {  # name -> (argv with {placeholders}, the expected line's start)
    "evaluate: missing checkpoint": ("evaluate --checkpoint {dir}/nope.pt --data-root {root} --output {out}",
                                     "refseg: error: checkpoint '{dir}/nope.pt' does not exist"),
    "evaluate: corrupt checkpoint": ("evaluate --checkpoint {dir}/junk.pt --data-root {root} --output {out}",
                                     "refseg: error: model file '{dir}/junk.pt' could not be read"),
    "evaluate: empty checkpoint": ("evaluate --checkpoint {dir}/empty.pt --data-root {root} --output {out}",
                                   "refseg: error: model file '{dir}/empty.pt' could not be read"),
    "evaluate: no data root": ("evaluate --checkpoint {ckpt} --data-root {dir}/nodata --output {out}",
                               "refseg: error: data root {dir}/nodata does not exist"),
    "evaluate: wrong split_by": ("evaluate --checkpoint {ckpt} --data-root {root} --split-by umd --output {out}",
                                 "refseg: error: refs file {root}/refcoco/refs(umd).p does not exist"),
    "evaluate: output under a file": ("evaluate --checkpoint {ckpt} --data-root {root} --output {dir}/afile/out",
                                      "refseg: error: --output {dir}/afile/out is under {dir}/afile, which is a file"),
    "segment: corrupt checkpoint": ("segment --checkpoint {dir}/junk.pt --input {dir}/rows.jsonl --output {out}",
                                    "refseg: error: model file '{dir}/junk.pt' could not be read"),
    "export: corrupt artifact folder": ("export --checkpoint {dir}/art --out {out}",
                                        "refseg: error: artifact folder '{dir}/art': model.safetensors could not be read"),
    "export-onnx: corrupt checkpoint": ("export-onnx --checkpoint {dir}/junk.pt --out {out}/m.onnx",
                                        "refseg: error: model file '{dir}/junk.pt' could not be read"),
    "prepare: no data root": ("prepare --data-root {dir}/nodata --out {out}",
                              "refseg: error: data root {dir}/nodata does not exist"),
    "tune: no data root": (("tune --config debug --space fusion_lr --output-dir {out} data.synthetic=false "
                            "data.root={dir}/nodata"), "refseg: error: data root {dir}/nodata does not exist"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fails_before_ray_and_creates_nothing(case, files):
    argv, want = CASES[case]
    with tempfile.TemporaryDirectory(prefix="rt") as ray_tmp:  # short: Ray's socket paths have a length limit
        out = Path(ray_tmp) / "out"
        fill = {k: str(v) for k, v in files.items()} | {"out": str(out)}
        r = run_cli(shlex.split(argv.format(**fill)), Path(ray_tmp))
        assert r.returncode == 2, r.stderr[-3000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(want.format(**fill)), r.stderr[-3000:]
        assert os.listdir(ray_tmp) == []  # no ray/session_* (Ray never started) and no output dir
