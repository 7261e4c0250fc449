"""Batch segmentation of a manifest of (image, expression) rows, with Ray Data actors.

    summary = segment("model.pt", "rows.jsonl", "out/", workers=2)   # summary["exit_code"]: 0 or 3

Manifest: JSON Lines (``.jsonl``/``.ndjson``/``.json``) or CSV with a header, one row per request:
    {"id": "dog1", "image": "imgs/dog.jpg", "text": "the dog on the left"}
``image`` is a local path (relative paths are resolved against the manifest's directory) or any URI
pyarrow understands (s3://, gs://, hdfs://, file://). ``id`` becomes a file name: letters, digits and
punctuation except path separators, no '..', at most 200 bytes.

Outputs in OUT (a local directory):
    masks/<id>.png        binary mask (255 = object) at the image's original size (atomic writes)
    overlays/<id>.png     the mask over the image (with ``overlays``)
    results.jsonl         {id, image, text, mask (path relative to OUT), mask_area (pixels),
                           mean_prob (mean probability over the predicted mask, 0.0 when empty),
                           height, width} per finished row, appended as results arrive
    errors.jsonl          {line, id (when known), reason} per bad row of the latest run
Re-running with the same OUT skips ids already in results.jsonl (and appends); errors.jsonl is
rewritten each run. Rows are validated in the driver (JSON, UTF-8, fields, text, ids, duplicates);
images are decoded inside the actors, where a failure becomes an error row, never an exception.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from refseg.config import ConfigError
from refseg.infer.batch import actor_pool, check_batch_args, predictor_from_box, ship_checkpoint
from refseg.infer.predictor import to_rgb
from refseg.infer.visualize import mask_png, overlay, save_png
from refseg.io import is_uri, resolve_path, write_text_atomic
from refseg.progress import Progress
from refseg.runtime import init_ray

log = logging.getLogger("refseg.infer")

EXIT_OK, EXIT_SOME_FAILED = 0, 3
FIELDS = ("id", "image", "text")
MAX_ID_BYTES = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# ----------------------------------------------------------------------------- manifest validation
def id_problem(raw: Any) -> str | None:
    """Why ``raw`` cannot be a file-name id (one sentence), or None."""
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        return f"id {raw!r} is not a string or an integer; give every row a string id"
    s = str(raw)
    if not s.strip():
        return "id is empty; give every row a non-empty id"
    if "/" in s or "\\" in s or ".." in s or s == ".":
        return f"id {s!r} contains a path separator or '..'; ids become file names, so use e.g. letters, digits, '-', '_'"
    if _CONTROL.search(s):
        return f"id {s!r} contains control characters; ids become file names"
    if len(s.encode("utf-8")) > MAX_ID_BYTES:
        return f"id {s[:40]!r}... is longer than {MAX_ID_BYTES} bytes; ids become file names, shorten it"
    return None


def _lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, decoded text or None when the line is not UTF-8), blank lines dropped."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for n, raw in enumerate(data.split(b"\n"), 1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            yield n, raw.decode("utf-8")
        except UnicodeDecodeError:
            yield n, None


def _not_utf8(n: int) -> dict:
    return {"line": n, "reason": f"line {n} is not valid UTF-8; re-save the manifest as UTF-8"}


def _jsonl_rows(path: Path, errors: list) -> Iterator[tuple[int, Any]]:
    for n, text in _lines(path):
        if text is None:
            errors.append(_not_utf8(n))
            continue
        try:
            yield n, json.loads(text)
        except ValueError as e:
            errors.append({"line": n, "reason": f"line {n} is not valid JSON ({e.msg} at column {e.colno})"})


def _csv_rows(path: Path, errors: list) -> Iterator[tuple[int, Any]]:
    state = {"line": 0}

    def text_lines() -> Iterator[str]:
        for n, text in _lines(path):
            if text is None:
                errors.append(_not_utf8(n))
                continue
            state["line"] = n
            yield text

    reader = csv.reader(text_lines())
    header = next(reader, None)
    if header is None:
        return
    header = [h.strip() for h in header]
    missing = [f for f in FIELDS if f not in header]
    if missing:
        raise ConfigError(f"CSV manifest '{path}' has no column(s) {', '.join(missing)} in its header "
                          f"{header}; the first line must name the columns id,image,text")
    for cells in reader:
        n = state["line"]
        if len(cells) != len(header):
            errors.append({"line": n, "reason": f"line {n} has {len(cells)} fields but the header has "
                                                f"{len(header)}; quote values that contain commas"})
            continue
        yield n, {k: v for k, v in zip(header, cells) if v != "" or k not in FIELDS}


def read_requests(path: str | os.PathLike, done: set[str]) -> tuple[list[dict], list[dict], int]:
    """Validate the manifest: (good rows {line, id, image (resolved), image_given, text}, error rows,
    number of rows skipped because their id is already in ``done``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"manifest '{path}' does not exist or is not a file; pass a .jsonl or .csv file")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".json", ".csv"):
        raise ConfigError(f"manifest '{path}' must end in .jsonl (JSON Lines) or .csv")
    base = str(path.resolve().parent)
    errors: list[dict] = []
    rows = _csv_rows(path, errors) if suffix == ".csv" else _jsonl_rows(path, errors)
    good, seen, skipped = [], {}, 0
    for n, row in rows:
        if not isinstance(row, dict):
            errors.append({"line": n, "reason": f"line {n} is not a JSON object with id, image and text"})
            continue
        rid = str(row["id"]) if isinstance(row.get("id"), (str, int)) and not isinstance(row.get("id"), bool) else None
        err = {"line": n, **({"id": rid} if rid is not None else {})}
        absent = [f for f in FIELDS if row.get(f) is None]
        if absent:
            errors.append({**err, "reason": f"line {n} has no {', '.join(repr(f) for f in absent)} field; "
                                            "every row needs id, image and text"})
            continue
        problem = id_problem(row["id"])
        if problem is None and rid in seen:
            problem = f"id {rid!r} is a duplicate of line {seen[rid]}; ids must be unique"
        if problem is None and (not isinstance(row["image"], str) or not row["image"].strip()):
            problem = "image is empty or not a string; give a file path or URI"
        if problem is None and (not isinstance(row["text"], str) or not row["text"].strip()):
            problem = "text is empty, whitespace or not a string; give a referring expression"
        if problem is not None:
            errors.append({**err, "reason": problem})
            continue
        seen[rid] = n
        if rid in done:
            skipped += 1
            continue
        good.append({"line": n, "id": rid, "image": resolve_path(base, row["image"].strip()),
                     "image_given": row["image"], "text": row["text"]})
    return good, errors, skipped


def done_ids(results: Path) -> set[str]:
    """ids already in results.jsonl (unparsable lines, e.g. a torn last line, are ignored)."""
    done: set[str] = set()
    if results.is_file():
        for raw in results.read_bytes().splitlines():
            try:
                done.add(str(json.loads(raw)["id"]))
            except (ValueError, KeyError, TypeError):
                continue
    return done


# ----------------------------------------------------------------------------- the actor
class SegmentActor:
    """Ray Data callable class: rows {line, id, image, text} -> masks on disk + one result per row."""

    def __init__(self, box: list, threshold: float, out: str, overlays: bool, compile: bool = False) -> None:
        self.predictor = predictor_from_box(box, compile)
        self.threshold, self.out, self.overlays = threshold, Path(out), overlays

    def __call__(self, batch: dict) -> dict:
        p, n = self.predictor, len(batch["id"])
        res = {"reason": [""] * n, "mask": [""] * n, "mask_area": np.zeros(n, np.int64),
               "mean_prob": np.zeros(n, np.float64), "height": np.zeros(n, np.int64), "width": np.zeros(n, np.int64)}
        good, images, xs, metas = [], [], [], []
        for i in range(n):
            src = str(batch["image"][i])
            if not is_uri(src) and not os.path.lexists(src):
                res["reason"][i] = (f"image file '{src}' does not exist; check the row's image path (relative "
                                    "paths are resolved against the manifest's directory)")
                continue
            try:
                image = to_rgb(src)
                x, meta = p.prepare(image)
            except Exception as e:  # noqa: BLE001 - any decode failure is this row's error, not the batch's
                res["reason"][i] = _one_sentence(e)
                continue
            good.append(i), images.append(image), xs.append(x), metas.append(meta)
        if good:
            try:
                probs, _ = p.forward(np.stack(xs), [str(batch["text"][i]) for i in good])
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: report the rows, keep the run
                probs = None
                for i in good:
                    res["reason"][i] = f"the model failed on this batch ({type(e).__name__}: {e})"
            for j, i in enumerate(good if probs is not None else []):
                mask, prob = p.finish(probs[j], metas[j], self.threshold)
                rid = str(batch["id"][i])
                save_png(mask_png(mask), self.out / "masks" / f"{rid}.png")
                if self.overlays:
                    save_png(overlay(images[j], mask), self.out / "overlays" / f"{rid}.png")
                area = int(np.count_nonzero(mask))
                res["mask"][i] = f"masks/{rid}.png"
                res["mask_area"][i] = area
                res["mean_prob"][i] = float(prob[mask].mean()) if area else 0.0
                res["height"][i], res["width"][i] = mask.shape
        return {"line": np.asarray(batch["line"], np.int64), "id": np.asarray(batch["id"], dtype=object),
                "actor": np.full(n, os.getpid(), np.int64),
                "reason": np.asarray(res.pop("reason"), dtype=object),
                "mask": np.asarray(res.pop("mask"), dtype=object), **res}


def _one_sentence(e: Exception) -> str:
    from refseg.data.transforms import ImageError

    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, ImageError):
        return msg
    return f"the image could not be read ({type(e).__name__}: {msg})"


# ----------------------------------------------------------------------------- the driver
def _append_line(f: Any, obj: dict) -> None:
    f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def _open_results(path: Path) -> Any:
    """results.jsonl for appending; a torn last line (killed run) gets its newline first."""
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - closed by the caller's with-block
    f.seek(0, os.SEEK_END)
    if f.tell() > 0:
        f.seek(f.tell() - 1)
        if f.read(1) != "\n":
            f.write("\n")
    return f


def _collect(ds: Any, results_path: Path, good: list[dict], workers: int) -> tuple[int, list[dict], Any]:
    """Stream the actors' rows: results appended as they arrive; returns (ok, error rows, steady_from)
    where steady_from = (time, rows back) once every actor has returned a batch (start-up excluded)."""
    given = {r["id"]: (r["image_given"], r["text"]) for r in good}
    ok, rows_back, actors, steady_from, errors = 0, 0, set(), None, []
    with _open_results(results_path) as f, Progress("segment", total=len(good), unit="images") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows_back += len(batch["id"])
            bar.update(len(batch["id"]))
            actors.update(int(a) for a in batch["actor"])
            if steady_from is None and len(actors) == workers:
                steady_from = (time.time(), rows_back)
            for i in range(len(batch["id"])):
                rid = str(batch["id"][i])
                if batch["reason"][i]:
                    errors.append({"line": int(batch["line"][i]), "id": rid, "reason": str(batch["reason"][i])})
                    continue
                image, text = given[rid]
                _append_line(f, {"id": rid, "image": image, "text": text, "mask": str(batch["mask"][i]),
                                 "mask_area": int(batch["mask_area"][i]),
                                 "mean_prob": round(float(batch["mean_prob"][i]), 6),
                                 "height": int(batch["height"][i]), "width": int(batch["width"][i])})
                ok += 1
            f.flush()
    return ok, errors, steady_from


def segment(checkpoint: str | os.PathLike, manifest: str | os.PathLike, output: str | os.PathLike, *,
            workers: int = 1, batch_size: int = 8, threshold: float = 0.5, overlays: bool = False,
            address: str | None = None, compile: bool = False) -> dict:
    """Segment every manifest row into ``output`` (see the module docstring); returns a summary with
    ``exit_code`` 0 (every row succeeded) or 3 (some rows are in errors.jsonl)."""
    check_batch_args(checkpoint, output, workers, batch_size, threshold)
    t0 = time.time()
    out = Path(output).expanduser().resolve()
    good, errors, already = read_requests(manifest, done_ids(out / "results.jsonl"))
    for sub in ("masks", "overlays") if overlays else ("masks",):
        (out / sub).mkdir(parents=True, exist_ok=True)
    ok, steady_from = 0, None
    if good:
        init_ray(address)
        box, _ = ship_checkpoint(checkpoint)
        rows = [{k: r[k] for k in ("line", "id", "image", "text")} for r in good]
        kwargs = {"box": box, "threshold": threshold, "out": str(out), "overlays": overlays, "compile": compile}
        ds = actor_pool(SegmentActor, rows, kwargs, workers=workers, batch_size=batch_size)
        ok, failed, steady_from = _collect(ds, out / "results.jsonl", good, workers)
        errors += failed
    errors.sort(key=lambda e: e["line"])
    write_text_atomic(out / "errors.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
    end = time.time()
    steady = None  # rows finished after every actor was up, per second (start-up and model load excluded)
    if steady_from is not None and end > steady_from[0] and len(good) > steady_from[1]:
        steady = (len(good) - steady_from[1]) / (end - steady_from[0])
    return {"segmented": ok, "already_done": already, "failed": len(errors), "wall_s": round(end - t0, 2),
            "images_per_s": round(ok / (end - t0), 2), "steady_images_per_s": round(steady, 2) if steady else None,
            "output": str(out), "exit_code": EXIT_SOME_FAILED if errors else EXIT_OK}


def format_summary(s: dict) -> str:
    """The final one-line summary."""
    line = (f"segment: {s['segmented']} segmented, {s['already_done']} already done, {s['failed']} failed "
            f"-> {s['output']} ({s['images_per_s']:.1f} images/s, {s['wall_s']:.1f} s)")
    if s["failed"]:
        line += f"; see {Path(s['output']) / 'errors.jsonl'}"
    return line
