"""The Ray Serve application: one deployment (``SegmentService``) behind a FastAPI ingress.

    POST /v1/segment          multipart (image file + text) or JSON {"image": base64, "text"} -> mask as
                              COCO RLE, width, height, score, latency_ms (+ no_target_prob); ?format=png
                              answers the mask as a PNG, ?attn=1 adds the attention heat map
    POST /v1/segment/batch    one image, several texts (multipart: repeated 'text'; JSON: "texts": [...])
    GET  /healthz             {"status": "ok"} once the model is loaded
    GET  /v1/model            preset, resolved config, refseg version, checkpoint sha256, batching settings
    GET  /                    the page (page/index.html + page/app.js): pick an image, type, see the mask

A request is parsed and its image decoded in the replica's handler (bad input: a 4xx with one sentence,
:mod:`refseg.serve.codec`); decoded images from concurrent requests meet in ``predict_batched``
(``@serve.batch``: up to ``max_batch_size`` of them, waiting at most ``batch_wait_ms``) and go through
``Predictor.predict_batch`` -- the code of ``Predictor.predict``, so the served mask is Predictor's mask.
Backpressure is Serve's: a replica works on ``max_ongoing_requests`` at once, each proxy queues
``max_queued_requests`` more, and beyond that answers 503 with ``Retry-After``.

    app = make_app(ServeOptions(checkpoint="model.pt"))   # a bound Serve application
    build_app({"checkpoint": "model.pt"})                  # the same from a Serve config's ``args``
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at import
import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

import refseg
from refseg.serve.codec import (
    BadRequest,
    body_kind,
    check_body_size,
    check_texts,
    decode_image,
    json_fields,
    mask_png,
    result_json,
)
from refseg.serve.options import ServeOptions, check_options, options_from_args

PAGE_DIR = Path(__file__).parent / "page"
FORMATS = ("json", "png")
api = FastAPI(title="refseg", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(BadRequest)
async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
    """A refused request: its 4xx status and ``{"error": one sentence}``."""
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file, or of a checkpoint dir's files (relative paths and bytes, sorted)."""
    p = Path(path).expanduser()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        if f != p:
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def query_flags(request: Request) -> tuple[str, bool]:
    """(format 'json' | 'png', attn wanted) from the query string; BadRequest for an unknown format."""
    fmt = request.query_params.get("format", "json").lower()
    if fmt not in FORMATS:
        raise BadRequest(400, f"query parameter format='{fmt}' is not supported; use format=json or format=png")
    return fmt, request.query_params.get("attn", "0").lower() in ("1", "true", "yes")


async def form_fields(request: Request, batch: bool, max_texts: int) -> tuple[bytes, list[Any]]:
    """(image bytes, texts) of a multipart/form-data body (fields 'image' = a file, 'text', repeated for batch)."""
    try:
        form = await request.form(max_files=1, max_fields=max_texts + 1)
    except Exception as e:  # noqa: BLE001 -- starlette's MultiPartException / HTTPException, a missing boundary
        raise BadRequest(400, f"the multipart body could not be parsed ({getattr(e, 'detail', e)}); send it as "
                              f"multipart/form-data with fields 'image' and 'text'") from None
    upload = form.get("image")
    if upload is None:
        raise BadRequest(400, "the form has no 'image' field; attach the image file as field 'image'")
    if isinstance(upload, str):
        raise BadRequest(400, "form field 'image' must be a file upload (e.g. curl -F image=@photo.jpg)")
    texts = form.getlist("text")
    if not texts:
        raise BadRequest(400, "the form has no 'text' field; add the referring expression as field 'text'")
    if len(texts) > 1 and not batch:
        raise BadRequest(400, f"the form has {len(texts)} 'text' fields; send one, or POST to /v1/segment/batch")
    return await upload.read(), list(texts)


@serve.deployment(name="SegmentService")
@serve.ingress(api)
class SegmentService:
    """One replica: the checkpoint's Predictor, its batch queue and the HTTP routes (module docstring)."""

    def __init__(self, options: dict[str, Any]) -> None:
        from refseg.infer.predictor import Predictor

        self.opts = ServeOptions(**options)
        self.predictor = Predictor.from_checkpoint(self.opts.checkpoint, self.opts.device)
        self.predict_batched.set_max_batch_size(self.opts.max_batch_size)
        self.predict_batched.set_batch_wait_timeout_s(self.opts.batch_wait_ms / 1000.0)
        cfg = self.predictor.config
        self.info = {"preset": cfg.model.preset, "refseg_version": refseg.__version__,
                     "checkpoint": str(self.opts.checkpoint),
                     "checkpoint_sha256": checkpoint_sha256(self.opts.checkpoint),
                     "image_size": self.predictor.image_size, "device": self.opts.device,
                     "threshold": self.opts.threshold, "max_batch_size": self.opts.max_batch_size,
                     "batch_wait_ms": self.opts.batch_wait_ms, "config": cfg.to_dict()}
        self.page = {name: (PAGE_DIR / name).read_text(encoding="utf-8") for name in ("index.html", "app.js")}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def predict_batched(self, items: list[tuple[Any, str]]) -> list[Any]:
        """[(image (H, W, 3) uint8, text)] from concurrent requests -> their Predictions, one forward pass.

        The pass runs on the replica's event loop, not in a thread: the requests arriving meanwhile wait
        in Ray's queue (no GIL needed) and then meet in the next batch. Handed to a thread, the forward
        held the GIL against the loop, requests trickled in one at a time and 434 of 466 batches had one
        request (bench/serve.py: batched 14.4 req/s vs 16.0 unbatched; inline 39.1 vs 21.6)."""
        images, texts = [im for im, _ in items], [t for _, t in items]
        return self.predictor.predict_batch(images, texts, self.opts.threshold)

    async def read_request(self, request: Request, batch: bool) -> tuple[Any, list[str]]:
        """The decoded image and the checked texts of a segment request (BadRequest otherwise)."""
        kind = body_kind(request.headers.get("content-type"))
        declared = request.headers.get("content-length", "")
        if declared.isdigit():
            check_body_size(int(declared), self.opts.max_body_bytes)
        body = await request.body()
        check_body_size(len(body), self.opts.max_body_bytes)
        if kind == "json":
            image, texts = json_fields(body, batch)
        else:
            image, texts = await form_fields(request, batch, self.opts.max_texts)
        texts = check_texts(texts, self.opts.max_text_chars, self.opts.max_texts)
        # decoded on the loop as well (bounded: the header's size is checked against max_pixels first); a
        # thread hop per request starved the loop like the forward pass did (predict_batched)
        rgb = decode_image(image, self.opts.max_pixels)
        return rgb, texts

    @api.post("/v1/segment")
    async def segment(self, request: Request) -> Response:
        """One image and one text -> the mask (JSON with COCO RLE, or a PNG with ?format=png)."""
        t0 = time.perf_counter()
        fmt, with_attn = query_flags(request)
        rgb, texts = await self.read_request(request, batch=False)
        pred = await self.predict_batched((rgb, texts[0]))
        latency_ms = round((time.perf_counter() - t0) * 1000, 2)
        if fmt == "png":
            out = result_json(pred)
            headers = {"X-Refseg-Score": str(out["score"]), "X-Refseg-Latency-Ms": str(latency_ms)}
            if "no_target_prob" in out:
                headers["X-Refseg-No-Target-Prob"] = str(out["no_target_prob"])
            return Response(mask_png(pred.mask), media_type="image/png", headers=headers)
        return JSONResponse({**result_json(pred, with_attn), "latency_ms": latency_ms})

    @api.post("/v1/segment/batch")
    async def segment_batch(self, request: Request) -> JSONResponse:
        """One image and several texts -> {"width", "height", "results": [one per text], "latency_ms"}."""
        t0 = time.perf_counter()
        fmt, with_attn = query_flags(request)
        if fmt != "json":
            raise BadRequest(400, "the batch endpoint answers JSON only; request masks as PNG one by one "
                                  "from /v1/segment?format=png")
        rgb, texts = await self.read_request(request, batch=True)
        preds = await asyncio.gather(*(self.predict_batched((rgb, t)) for t in texts))
        results = []
        for text, pred in zip(texts, preds):
            r = result_json(pred, with_attn)
            del r["width"], r["height"]
            results.append({"text": text, **r})
        h, w = rgb.shape[:2]
        return JSONResponse({"width": int(w), "height": int(h), "results": results,
                             "latency_ms": round((time.perf_counter() - t0) * 1000, 2)})

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/model")
    async def model(self) -> dict[str, Any]:
        return self.info

    @api.get("/")
    async def index(self) -> HTMLResponse:
        return HTMLResponse(self.page["index.html"])

    @api.get("/app.js")
    async def script(self) -> Response:
        return Response(self.page["app.js"], media_type="text/javascript")


def make_app(opts: ServeOptions) -> serve.Application:
    """The bound application for ``opts``: ``replicas`` replicas of 1 CPU (``device='cpu'``) or 1 GPU
    each, Serve's backpressure (503 + Retry-After beyond ``max_queued_requests``)."""
    from ray.serve.config import BackpressureConfig

    resources = {"num_cpus": 1, "num_gpus": 1} if opts.device == "cuda" else {"num_cpus": 1}
    return SegmentService.options(
        num_replicas=opts.replicas, max_ongoing_requests=opts.max_ongoing_requests,
        max_queued_requests=opts.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=opts.retry_after_s),
        ray_actor_options=resources,
    ).bind(opts.to_dict())


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder (``import_path: refseg.serve.app:build_app`` in cluster/serve.yaml):
    the config's ``args`` are :class:`ServeOptions` fields, checked like ``refseg serve``'s flags."""
    opts = options_from_args(dict(args))
    check_options(opts)
    return make_app(opts)
