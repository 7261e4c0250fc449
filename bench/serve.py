"""Online serving load test: dynamic batching vs ``max_batch_size=1``, same model, same run, loopback HTTP.

    python bench/serve.py                                  # 8 clients x 50 requests, tiny model at 64 px
    python bench/serve.py --clients 16 --requests 30 --image-size 128 --max-batch-size 16

A tiny model (random init, seed 0) is saved with ``data.image_size = --image-size``; one synthetic
160x120 JPEG is the request image. A local Ray instance (2 CPUs) runs Serve's proxy and ONE replica
(1 CPU, so torch runs one thread) of the real application (``refseg.serve.run.deploy``). For each
setting -- batched (``--max-batch-size``, ``--batch-wait-ms``), then unbatched (``max_batch_size=1``) --
the app is (re)deployed, warmed up with ``2 x clients`` requests, then ``--clients`` threads each send
``--requests`` multipart POSTs to /v1/segment back to back (closed loop, one HTTP session each). Printed
per setting: requests/s over the wall time, p50 / p99 latency seen by the clients, non-200 answers.
The last line is ``... ratio=<batched / unbatched requests/s>``.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_checkpoint(work: Path, image_size: int) -> Path:
    import torch

    from refseg.config import config_from_dict
    from refseg.models import build_model
    from refseg.models.export import save_model

    cfg = config_from_dict({"model": {"preset": "tiny"}, "data": {"image_size": image_size}})
    torch.manual_seed(0)
    return save_model(work / "model.pt", build_model(cfg.model, pretrained=False).eval(), cfg.to_dict())


def make_image() -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (160, 120), (40, 90, 160))
    draw = ImageDraw.Draw(img)
    draw.ellipse((20, 30, 70, 80), fill=(220, 30, 30))
    draw.rectangle((95, 20, 145, 100), fill=(30, 200, 60))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def load(url: str, image: bytes, clients: int, requests_per_client: int) -> dict:
    """Closed-loop load: ``clients`` threads x ``requests_per_client`` POSTs -> rate and latencies."""
    import requests

    def client(i: int) -> tuple[list[float], int]:
        lat, bad = [], 0
        with requests.Session() as s:
            for k in range(requests_per_client):
                t = time.perf_counter()
                r = s.post(url + "v1/segment", files={"image": ("b.jpg", image, "image/jpeg")},
                           data={"text": f"the red circle {i} {k % 5}"}, timeout=120)
                lat.append(time.perf_counter() - t)
                bad += r.status_code != 200
        return lat, bad

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    lat = np.array([x for r, _ in results for x in r]) * 1000
    return {"rps": len(lat) / wall, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "non_200": sum(b for _, b in results), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients (threads)")
    ap.add_argument("--requests", type=int, default=50, help="requests per client")
    ap.add_argument("--image-size", type=int, default=64, help="the tiny model's data.image_size")
    ap.add_argument("--max-batch-size", type=int, default=8, help="the batched setting's max_batch_size")
    ap.add_argument("--batch-wait-ms", type=float, default=25.0,
                    help="the batched setting's batch_wait_ms (25: about one batch-1 forward of the tiny model "
                         "at 64 px on one CPU core, so a batch waits about as long as a lone request computes)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import requests
    from ray import serve

    from refseg.serve.options import ServeOptions
    from refseg.serve.run import deploy

    with tempfile.TemporaryDirectory(prefix="refseg-bench-serve-") as tmp:
        ckpt = make_checkpoint(Path(tmp), args.image_size)
        image = make_image()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        results = {}
        try:
            for label, batch in (("batched", args.max_batch_size), ("unbatched", 1)):
                opts = ServeOptions(checkpoint=str(ckpt), max_batch_size=batch, batch_wait_ms=args.batch_wait_ms,
                                    max_ongoing_requests=max(16, 2 * args.clients), max_queued_requests=64)
                url = deploy(opts, "127.0.0.1", port)
                assert requests.get(url + "healthz", timeout=60).status_code == 200
                load(url, image, args.clients, 2)  # warm-up
                results[label] = r = load(url, image, args.clients, args.requests)
                print(f"{label:9s} max_batch_size={batch:2d}: {r['rps']:6.1f} req/s  p50 {r['p50_ms']:6.1f} ms  "
                      f"p99 {r['p99_ms']:6.1f} ms  non-200 {r['non_200']}  ({args.clients} clients x "
                      f"{args.requests} requests in {r['wall_s']:.1f} s)", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    ratio = results["batched"]["rps"] / results["unbatched"]["rps"]
    print(f"serve clients={args.clients} image_size={args.image_size} batch_wait_ms={args.batch_wait_ms:g} "
          f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
