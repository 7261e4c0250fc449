"""The command line as the README documents it: every `refseg ...` line there parses to its verb."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from refseg.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
VERBS = {"train", "synth", "model-info", "demo", "prepare", "evaluate", "segment", "export", "export-onnx", "tune", "serve"}


def readme_commands() -> list[list[str]]:
    """The README's indented `refseg ...` command lines (continuations joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", "", (REPO / "README.md").read_text())
    found = []
    for line in text.splitlines():
        if line.startswith("    refseg "):
            line = line.split("  #")[0].replace("[key=value ...]", "train.lr=2e-4")  # an override in its place
            found.append(shlex.split(line)[1:])
    return found


def test_every_documented_verb_is_in_the_readme_and_the_parser():
    commands = readme_commands()
    assert {c[0] for c in commands} == VERBS - {"demo"}  # the demo is documented as `make demo`
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    assert set(sub.choices) == VERBS


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_lines_parse(argv):
    args = build_parser().parse_args(argv)
    assert args.verb == argv[0] and callable(args.fn)
    assert args.fn.__name__ == "cmd_" + argv[0].replace("-", "_")


def test_model_info_runs_in_process(capsys):
    assert main(["model-info", "--preset", "tiny"]) == 0
    assert "total" in capsys.readouterr().out.lower()


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", "--config", "no-such-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("refseg: error: config 'no-such-config' is neither a file nor a config shipped in configs/; "
                    "pass a YAML path")]


def test_python_dash_m_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "refseg.cli", "--help"], check=False, capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(verb in r.stdout for verb in VERBS)


# ----------------------------------------------------------------------------- output paths that cannot be used
def _output_cases(ckpt: Path, root: Path, manifest: Path) -> list[tuple[list[str], str, str]]:
    """(argv before the output flag, the flag, the kind of output) for every verb that writes somewhere."""
    return [
        (["train", "--config", "debug"], "--output-dir", "dir"),
        (["evaluate", "--checkpoint", str(ckpt), "--data-root", str(root)], "--output", "dir"),
        (["segment", "--checkpoint", str(ckpt), "--input", str(manifest)], "--output", "dir"),
        (["prepare", "--data-root", str(root)], "--out", "dir"),
        (["tune", "--config", "debug", "--space", "fusion_lr"], "--output-dir", "dir"),
        (["demo"], "--output-dir", "dir"),
        (["synth"], "--out", "dir"),
        (["export-onnx", "--checkpoint", str(ckpt)], "--out", "file"),
    ]


def test_output_path_that_is_a_file_or_under_one_is_one_sentence(tmp_path, synthetic_root, tmp_path_factory, capsys):
    from test_predictor import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path_factory)
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text('{"id": "a", "image": "a.png", "text": "the dog"}\n')
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for argv, flag, kind in _output_cases(ckpt, synthetic_root, manifest):
        bad = tmp_path if kind == "file" else a_file  # a dir where a file goes, a file where a dir goes
        assert main([*argv, flag, str(bad)]) == 2, argv
        what = "a directory; pass a file path inside it" if kind == "file" else \
            "a file; pass a directory (a new or an existing one)"
        assert capsys.readouterr().err == f"refseg: error: {flag} {bad} is {what}\n", argv
        under = a_file / "sub" / ("m.onnx" if kind == "file" else "out")
        assert main([*argv, flag, str(under)]) == 2, argv
        assert capsys.readouterr().err == (f"refseg: error: {flag} {under} is under {a_file}, which is a file; pass a "
                                           "path that is not inside a file\n"), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "rows.jsonl"]


# ----------------------------------------------------------------------------- interrupts
def test_interrupted_verbs_say_what_to_do_and_exit_128_plus_the_signal(monkeypatch, tmp_path, capsys):
    """Ctrl-C (SIGINT) and SIGTERM reaching a verb: one line, 130 / 143, the SIGTERM handler restored after."""
    import os
    import signal
    import time

    import refseg.data

    def interrupt_with(sig):
        def fake(*args, **kwargs):
            os.kill(os.getpid(), sig)
            time.sleep(30)  # the handler raises in here
            raise AssertionError("the signal did not interrupt")
        return fake

    before = signal.getsignal(signal.SIGTERM)
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        monkeypatch.setattr(refseg.data, "prepare", interrupt_with(sig))
        assert main(["prepare", "--data-root", str(tmp_path), "--manifest", "m.jsonl", "--out", str(tmp_path / "s")]) \
            == code
        assert capsys.readouterr().err == ("refseg: interrupted: the shard files written are whole but the set is "
                                           "incomplete; re-run the same command to write it again from the start\n")
        assert signal.getsignal(signal.SIGTERM) is before
