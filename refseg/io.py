"""Paths, URIs and atomic writes: every file refseg writes appears whole or not at all.

    write_text_atomic(out / "summary.json", json.dumps(summary))
    with atomic_path(out / "model.pt") as tmp:
        torch.save(payload, tmp)
    fs, inner = filesystem_and_path("s3://bucket/shards/part-0.parquet")
    check_output_dir(args.output_dir, "--output-dir")   # before anything starts: one sentence, rc 2
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import uuid
from collections.abc import Iterator
from pathlib import Path

from refseg.config.schema import ConfigError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a unique temp path next to ``path``; on success it replaces ``path`` in one rename.

    On an exception the temp file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def is_uri(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (s3, gs, hdfs, file, ...), False for plain local paths."""
    return "://" in str(path)


@functools.lru_cache(maxsize=16)
def bucket_filesystem(prefix: str):
    """The pyarrow FileSystem for ``scheme://bucket`` (one client per bucket, reused)."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(prefix)[0]


def filesystem_and_path(path: str | os.PathLike):
    """``(pyarrow FileSystem, path inside it)`` for a local path or any URI pyarrow understands."""
    import pyarrow.fs as pafs

    path = str(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    scheme, rest = path.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), rest
    bucket = rest.split("/", 1)[0]
    return bucket_filesystem(f"{scheme}://{bucket}"), pafs.FileSystem.from_uri(path)[1]


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a local file or of an object at a URI (s3://, gs://, ...)."""
    if not is_uri(path):
        with open(path, "rb") as f:
            return f.read()
    fs, inner = filesystem_and_path(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def resolve_path(base: str, path: str) -> str:
    """``path`` if absolute or a URI, else ``base/path`` (``base`` a local dir or a URI prefix)."""
    path = os.path.expanduser(str(path))
    if is_uri(path) or os.path.isabs(path):
        return path
    if is_uri(base):
        return posixpath.join(base, path)
    return os.path.normpath(os.path.join(base, path))


def parent_of(path: str) -> str:
    """The folder holding ``path`` (a URI's parent stays a URI)."""
    return posixpath.dirname(path) if is_uri(path) else os.path.dirname(os.path.abspath(path))


def new_figure(**kwargs):
    """``(fig, axes)`` from matplotlib's headless Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(**kwargs)


def save_figure_atomic(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def _existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of ``path`` that exists (``/`` at the latest)."""
    return next(p for p in path.parents if os.path.lexists(p))


def _check_parent(path: Path, given: str, flag: str) -> None:
    """Refuse ``path`` whose nearest existing ancestor is not a writable directory."""
    above = _existing_ancestor(path)
    if not above.is_dir():
        kind = "a file" if above.is_file() else "not a directory"
        raise ConfigError(f"{flag} {given} is under {above}, which is {kind}; pass a path that is not inside a file")
    if not os.access(above, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {given} cannot be written: {above} is not writable; pass a path you can write to")


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """Raise :class:`ConfigError` (naming ``flag``) unless ``path`` is an existing writable directory or
    can be created as one. Creates nothing; URIs pass (their storage is checked when written)."""
    given = str(path)
    if is_uri(given):
        return
    p = Path(given).expanduser().absolute()
    if os.path.lexists(p):
        if not p.is_dir():
            kind = "a file" if p.is_file() else "not a directory"
            raise ConfigError(f"{flag} {given} is {kind}; pass a directory (a new or an existing one)")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {given} is not writable; pass a directory you can write to")
        return
    _check_parent(p, given, flag)


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """Raise :class:`ConfigError` (naming ``flag``) unless a file can be written at ``path`` (it may
    exist and is then replaced). Creates nothing."""
    given = str(path)
    p = Path(given).expanduser().absolute()
    if p.is_dir():
        raise ConfigError(f"{flag} {given} is a directory; pass a file path inside it")
    _check_parent(p, given, flag)
