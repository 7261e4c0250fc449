"""Starting and stopping the service: what ``refseg serve`` runs (tests and bench/serve.py use ``deploy``).

    url = deploy(opts, host="127.0.0.1", port=8000)   # Serve's HTTP proxy on host:port + the app, ready
    serve_forever(opts, host, port, address=None)      # refseg serve: deploy, print the URL, wait for Ctrl-C

The application is named ``refseg`` (``APP_NAME``) and routed at ``/``.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from refseg.config import ConfigError
from refseg.serve.options import ServeOptions, check_options

APP_NAME = "refseg"


def check_port(host: str, port: int) -> None:
    """ConfigError unless ``host:port`` can be bound here (a fresh local instance's proxy binds it)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None


def check_resources(opts: ServeOptions) -> None:
    """ConfigError when the cluster cannot hold ``opts.replicas`` replicas (Serve would wait for them forever)."""
    import ray

    res = ray.cluster_resources()
    kind, have = ("GPU", res.get("GPU", 0.0)) if opts.device == "cuda" else ("CPU", res.get("CPU", 0.0))
    if opts.replicas > have:
        raise ConfigError(f"--replicas {opts.replicas} needs {opts.replicas} {kind}s (one per replica) but the "
                          f"cluster has {have:g}; lower --replicas" + (" or use --device cpu" if kind == "GPU" else ""))


def deploy(opts: ServeOptions, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME,
           route_prefix: str = "/") -> str:
    """Start Serve's HTTP proxy on ``host:port`` (kept when Serve already runs on this Ray instance) and
    run the application; returns its URL once every replica is ready. Ray must be initialised."""
    from ray import serve

    from refseg.serve.app import make_app

    check_resources(opts)
    serve.start(http_options={"host": host, "port": port})
    serve.run(make_app(opts), name=name, route_prefix=route_prefix, blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}{route_prefix}"


def serve_forever(opts: ServeOptions, host: str, port: int, address: str | None = None) -> None:
    """``refseg serve``: check everything, attach to ``address`` / $RAY_ADDRESS or start a local instance,
    deploy, print the URL and serve until Ctrl-C / SIGTERM (KeyboardInterrupt), then remove the
    application from a cluster it attached to, or shut Serve down on the local instance it started."""
    from refseg.runtime import init_ray, ray_connected

    check_options(opts)
    attached = bool(address or os.environ.get("RAY_ADDRESS")) or ray_connected()  # jobs/serve.py: connected
    if not attached:
        check_port(host, port)
    init_ray(address)
    from ray import serve

    try:
        url = deploy(opts, host, port)
        print(f"refseg: serving {opts.checkpoint} at {url} (POST {url}v1/segment); Ctrl-C to stop", flush=True)
        while True:
            time.sleep(1)
    finally:
        print("refseg: stopping the service", file=sys.stderr, flush=True)
        if attached:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
