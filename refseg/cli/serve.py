"""The ``refseg serve`` verb: the segmentation service on Ray Serve (``add_verbs(subparsers)``)."""

from __future__ import annotations

import argparse

from refseg.cli.args import add_address, positive

SERVE_EPILOG = """\
endpoints: POST /v1/segment (multipart 'image' + 'text', or JSON {"image": <base64>, "text": ...};
  ?format=png for the mask as PNG), POST /v1/segment/batch (several texts), GET /healthz, GET /v1/model,
  GET / (a page to try it in the browser)
example: curl -F image=@photo.jpg -F text="the dog on the left" http://127.0.0.1:8000/v1/segment
on a cluster: serve deploy cluster/serve.yaml, or ray job submit ... -- python jobs/serve.py ARGS
"""


def cmd_serve(a: argparse.Namespace) -> int:
    from refseg.serve.options import ServeOptions
    from refseg.serve.run import serve_forever

    opts = ServeOptions(checkpoint=a.checkpoint, replicas=a.replicas, max_batch_size=a.max_batch_size,
                        batch_wait_ms=a.batch_wait_ms, device=a.device, threshold=a.threshold,
                        max_ongoing_requests=a.max_ongoing_requests, max_queued_requests=a.max_queued_requests)
    serve_forever(opts, a.host, a.port, a.address)
    return 0


def add_verbs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over HTTP (Ray Serve, dynamic batching, a page at /)",
                       epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="model.pt, a training output dir holding model.pt, or a DeepSpeed checkpoint dir "
                        "(readable on every replica's node)")
    p.add_argument("--replicas", type=positive(int), default=1, help="replicas (1 CPU, or 1 GPU with --device cuda, each)")
    p.add_argument("--max-batch-size", type=positive(int), default=8,
                   help="requests batched into one forward pass (1 = no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long a batch waits for more requests once the first has arrived")
    p.add_argument("--max-ongoing-requests", type=positive(int), default=16,
                   help="requests one replica works on at once")
    p.add_argument("--max-queued-requests", type=positive(int), default=32,
                   help="requests each proxy queues beyond those; more get 503 with Retry-After")
    p.add_argument("--threshold", type=float, default=0.5, help="mask = probability > threshold")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy listens on (0.0.0.0: every interface)")
    p.add_argument("--port", type=positive(int), default=8000)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    add_address(p)
    p.set_defaults(fn=cmd_serve, on_interrupt=lambda a: "stopped serving")
