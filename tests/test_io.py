"""refseg.io: atomic writes leave the whole new file or the old one, never a part or a temp file."""

from __future__ import annotations

import pytest

from refseg.io import (
    atomic_path,
    is_uri,
    parent_of,
    read_bytes,
    resolve_path,
    write_bytes_atomic,
    write_text_atomic,
)


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "summary.json"
    write_text_atomic(path, "old")
    write_text_atomic(path, "new é")
    assert path.read_text(encoding="utf-8") == "new é"
    write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert read_bytes(str(tmp_path / "b.bin")) == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "summary.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("good")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_uris_and_relative_paths():
    assert is_uri("s3://bucket/a.jpg") and not is_uri("/data/a.jpg")
    assert resolve_path("s3://bucket/set", "img/a.jpg") == "s3://bucket/set/img/a.jpg"
    assert resolve_path("/data/set", "img/../a.jpg") == "/data/set/a.jpg"
    assert resolve_path("/data/set", "/abs/a.jpg") == "/abs/a.jpg"
    assert parent_of("s3://bucket/set/m.jsonl") == "s3://bucket/set"
