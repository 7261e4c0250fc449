"""`refseg segment`: awkward-but-valid rows are segmented, every kind of bad row becomes one error line,
exit code 3, and a re-run skips finished rows."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_predictor import tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


def _huge_png_header(path: Path, side: int = 40_000) -> None:
    """A valid PNG signature + IHDR claiming side x side pixels (1.6 G pixels) and almost no data."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))


def _make_inputs(d: Path) -> tuple[list[bytes], dict[str, tuple[int, int]], dict[str, tuple[bytes, str]]]:
    """(manifest lines, good id -> (H, W), bad key -> (its manifest line, a fragment of its reason))."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (45, 61, 3), dtype=np.uint8)
    imgs = d / "imgs"
    imgs.mkdir()
    Image.fromarray(rgb).save(imgs / "rgb.jpg", quality=90)
    Image.fromarray(rgb[..., 1]).save(imgs / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(imgs / "cmyk.jpg")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(imgs / "rgba.png")
    Image.fromarray(rgb).convert("P").save(imgs / "palette.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).convert("I;16").save(imgs / "sixteen.png")
    Image.fromarray(rgb[:1, :1]).save(imgs / "one.png")
    (imgs / "empty.jpg").write_bytes(b"")
    full = (imgs / "rgb.jpg").read_bytes()
    (imgs / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (imgs / "notimage.jpg").write_text("this is not an image\n")
    (imgs / "adir.jpg").mkdir()
    _huge_png_header(imgs / "huge.png")

    def row(rid, image, text="the red one"):
        return json.dumps({"id": rid, "image": image, "text": text}, ensure_ascii=False).encode()

    good = {"rgb": ("imgs/rgb.jpg", (45, 61)), "gray": ("imgs/gray.png", (45, 61)),
            "cmyk": ("imgs/cmyk.jpg", (45, 61)), "rgba": ("imgs/rgba.png", (45, 61)),
            "palette": ("imgs/palette.png", (45, 61)), "sixteen": ("imgs/sixteen.png", (45, 61)),
            "one": ("imgs/one.png", (1, 1)), "uri": ((imgs / "rgb.jpg").as_uri(), (45, 61)),
            "abs": (str(imgs / "gray.png"), (45, 61))}
    lines = [row(k, v[0]) for k, v in good.items()]
    lines.append(row("long", "imgs/rgb.jpg", "the big red shape " * 300))
    lines.append(row("unicode-été", "imgs/rgb.jpg", "l'objet rouge à gauche — 左边的红色圆圈 🙂"))
    lines.append(json.dumps({"id": 17, "image": "imgs/rgb.jpg", "text": "integer id"}).encode())
    good.update({"long": ("", (45, 61)), "unicode-été": ("", (45, 61)), "17": ("", (45, 61))})
    bad = {
        "missing": (row("missing", "imgs/nope.jpg"), "does not exist"),
        "empty": (row("empty", "imgs/empty.jpg"), "empty"),
        "truncated": (row("truncated", "imgs/truncated.jpg"), "truncated or corrupt"),
        "notimage": (row("notimage", "imgs/notimage.jpg"), "not in a readable image format"),
        "adir": (row("adir", "imgs/adir.jpg"), "directory"),
        "huge": (row("huge", "imgs/huge.png"), "limit"),
        "blank": (row("blank", "imgs/rgb.jpg", ""), "text is empty"),
        "spaces": (row("spaces", "imgs/rgb.jpg", " \t "), "text is empty"),
        "notext": (json.dumps({"id": "notext", "image": "imgs/rgb.jpg"}).encode(), "no 'text' field"),
        "slash": (row("a/b", "imgs/rgb.jpg"), "path separator"),
        "dots": (row("..", "imgs/rgb.jpg"), "path separator or '..'"),
        "dup": (row("rgb", "imgs/gray.png"), "duplicate of line 1"),
        "badjson": (b'{"id": "badjson", "image": ', "not valid JSON"),
        "latin1": ('{"id": "latin1", "image": "imgs/rgb.jpg", "text": "caf\xe9"}'.encode("latin-1"), "not valid UTF-8"),
        "array": (b'["not", "an", "object"]', "not a JSON object"),
        "baduri": (row("baduri", (imgs / "gone.jpg").as_uri()), ""),
    }
    lines += [line for line, _ in bad.values()]
    lines.insert(5, b"   ")  # blank lines are ignored, not errors
    return lines, {k: v[1] for k, v in good.items()}, bad


def test_mixed_manifest_good_rows_segmented_bad_rows_reported_and_rerun_resumes(ray_session, ckpt, tmp_path, capsys):
    from refseg.cli import main

    lines, good, bad = _make_inputs(tmp_path)
    manifest = tmp_path / "rows.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    args = ["segment", "--checkpoint", str(ckpt), "--input", str(manifest), "--output", str(out),
            "--workers", "1", "--batch-size", "4", "--overlays"]
    assert main(args) == 3
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"{len(good)} segmented" in summary and f"{len(bad)} failed" in summary

    results = [json.loads(x) for x in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(r["id"] for r in results) == sorted(good)
    for r in results:
        mask = Image.open(out / r["mask"])
        assert (mask.height, mask.width) == good[r["id"]] == (r["height"], r["width"]), r["id"]
        arr = np.asarray(mask)
        assert set(np.unique(arr)) <= {0, 255} and int((arr > 0).sum()) == r["mask_area"]
        assert 0.0 <= r["mean_prob"] <= 1.0 and (r["mask_area"] == 0) == (r["mean_prob"] == 0.0)
        assert Image.open(out / "overlays" / f"{r['id']}.png").size == mask.size
    assert next(r for r in results if r["id"] == "uri")["image"].startswith("file://")

    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(errors) == len(bad)
    assert all(e["reason"] and "\n" not in e["reason"] and isinstance(e["line"], int) for e in errors)
    by_line = {e["line"]: e for e in errors}
    line_of = {raw: n for n, raw in enumerate(lines, 1)}
    for key, (raw, fragment) in bad.items():
        e = by_line[line_of[raw]]
        assert fragment in e["reason"], (key, e)
        if key not in ("badjson", "latin1", "array"):  # the id is reported whenever it could be read
            assert e["id"] == json.loads(raw)["id"], (key, e)
    assert not list((out / "masks").glob(".*"))  # no temp files left behind

    # re-run: finished rows are skipped (no new result lines, masks untouched), bad rows reported again
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "masks").iterdir()}
    with manifest.open("ab") as f:
        f.write(json.dumps({"id": "late", "image": "imgs/gray.png", "text": "added later"}).encode() + b"\n")
    assert main(args) == 3
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"1 segmented, {len(good)} already done, {len(bad)} failed" in summary
    again = [json.loads(x) for x in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in again] == [r["id"] for r in results] + ["late"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "masks").iterdir() if p.name != "late.png"} == mtimes
    assert len((out / "errors.jsonl").read_text().splitlines()) == len(bad)


def test_csv_manifest_and_exit_0(ray_session, ckpt, tmp_path):
    from refseg.cli import main

    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "rows.csv").write_text('id,image,text\nx1,a.png,"the shape, on the left"\nx2,a.png,grey\n')
    out = tmp_path / "out"
    assert main(["segment", "--checkpoint", str(ckpt), "--input", str(tmp_path / "rows.csv"),
                 "--output", str(out)]) == 0
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["x1.png", "x2.png"]
    assert (out / "errors.jsonl").read_text() == ""
    with (tmp_path / "rows.csv").open("a") as f:
        f.write("x3,a.png,too,many\n")
    assert main(["segment", "--checkpoint", str(ckpt), "--input", str(tmp_path / "rows.csv"),
                 "--output", str(out)]) == 3
    (err,) = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert err["line"] == 4 and "4 fields" in err["reason"]


def test_usage_errors_exit_2(ckpt, tmp_path, capsys):
    from refseg.cli import main

    assert main(["segment", "--checkpoint", str(ckpt), "--input", str(tmp_path / "no.jsonl"),
                 "--output", str(tmp_path / "o")]) == 2
    (tmp_path / "rows.txt").write_text("")
    assert main(["segment", "--checkpoint", str(ckpt), "--input", str(tmp_path / "rows.txt"),
                 "--output", str(tmp_path / "o")]) == 2
    (tmp_path / "bad.csv").write_text("name,path\n")
    assert main(["segment", "--checkpoint", str(ckpt), "--input", str(tmp_path / "bad.csv"),
                 "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and ".jsonl" in err and "no column(s) id, image, text" in err


@pytest.mark.slow
def test_two_workers_same_masks(ray_session, ckpt, synthetic_root, tmp_path):
    from refseg.data import load_split
    from refseg.infer import segment

    recs = load_split(synthetic_root, "refcoco", "unc", "val")[:12]
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"{r['ref_id']}_{r['sent_id']}", "image": r["image_path"],
                                            "text": r["sentence"]}) + "\n" for r in recs))
    s1 = segment(ckpt, manifest, tmp_path / "one", workers=1, batch_size=4)
    s2 = segment(ckpt, manifest, tmp_path / "two", workers=2, batch_size=4)
    assert s1["segmented"] == s2["segmented"] == 12 and s1["exit_code"] == s2["exit_code"] == 0
    for p in (tmp_path / "one" / "masks").iterdir():
        np.testing.assert_array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "two" / "masks" / p.name)))


def test_interrupt_reports_rows_done_and_exits_130_or_143(ckpt, tmp_path, monkeypatch, capsys):
    """Ctrl-C / SIGTERM while rows are being written: one line counting the rows in results.jsonl."""
    import importlib
    import os
    import signal
    import time

    from refseg.cli import main

    module = importlib.import_module("refseg.infer.segment")  # the module (refseg.infer.segment is the function)

    out = tmp_path / "out"
    out.mkdir()

    def interrupt_with(sig):
        def fake(*args, **kwargs):
            (out / "results.jsonl").write_text("".join(json.dumps({"id": f"r{i}"}) + "\n" for i in range(3)))
            os.kill(os.getpid(), sig)
            time.sleep(30)  # the handler raises in here
            raise AssertionError("the signal did not interrupt")
        return fake

    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        monkeypatch.setattr(module, "segment", interrupt_with(sig))
        assert main(["segment", "--checkpoint", str(ckpt), "--input", str(tmp_path / "rows.jsonl"),
                     "--output", str(out)]) == code
        assert capsys.readouterr().err == "refseg: interrupted: 3 done, re-run the same command to continue\n"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT to the group", "SIGTERM"])
def test_interrupt_mid_run_keeps_finished_rows_and_rerun_completes_each_once(how, ckpt, tmp_path):
    """A real `refseg segment` gets Ctrl-C (SIGINT to its process group, as a terminal sends it) or SIGTERM
    (to its process, as `kill` or a spot node's notice sends it) once its first rows are in results.jsonl:
    no traceback, the sentence, exit 130 / 143; the re-run adds every other row."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / f"img{k}.png")
    rows = 1500  # minutes of work at batch size 2: the interrupt lands mid-run
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "image": f"img{i % 4}.png",
                                                             "text": "the red one"}) + "\n" for i in range(rows)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "refseg.cli", "segment", "--checkpoint", str(ckpt), "--input",
           str(tmp_path / "rows.jsonl"), "--output", str(out), "--batch-size", "2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        results = out / "results.jsonl"
        deadline = time.time() + 600
        while not (results.is_file() and results.stat().st_size > 0) and proc.poll() is None:
            assert time.time() < deadline, "no result within 10 minutes"
            time.sleep(0.05)
        if how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done = [json.loads(line)["id"] for line in results.read_text().splitlines()]
    assert proc.returncode == (143 if how == "SIGTERM" else 130), stderr[-3000:]
    assert "Traceback" not in stderr + stdout, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"refseg: interrupted: {len(done)} done, re-run the same command to continue"
    assert 0 < len(done) < rows

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{rows - len(done)} segmented, {len(done)} already done, 0 failed" in again.stdout
    ids = [json.loads(line)["id"] for line in results.read_text().splitlines()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(rows))  # every row exactly once
