"""The settings of the segmentation service, checked before Ray starts (no torch, no Ray imported).

    opts = ServeOptions(checkpoint="runs/debug/model.pt", max_batch_size=8)
    check_options(opts)                       # ConfigError (one sentence naming the flag) unless usable
    opts = options_from_args({"checkpoint": ..., "max_batch_size": 8})   # a Serve config's ``args``

``refseg serve`` builds one from its flags; ``cluster/serve.yaml`` passes the same names as ``args`` to
:func:`refseg.serve.app.build_app`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from refseg.config import ConfigError
from refseg.config.load import closest_key

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class ServeOptions:
    """One Serve application: the checkpoint, replicas and their batching, backpressure and input limits.

    ``max_ongoing_requests``: requests one replica works on at once (the batches are drawn from them);
    ``max_queued_requests``: requests each HTTP proxy holds beyond that before answering 503 with
    ``Retry-After: retry_after_s``. ``max_pixels`` / ``max_text_chars`` / ``max_texts`` /
    ``max_body_bytes`` bound one request (larger ones get a 4xx)."""

    checkpoint: str
    replicas: int = 1
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    device: str = "cpu"
    threshold: float = 0.5
    max_ongoing_requests: int = 16
    max_queued_requests: int = 32
    retry_after_s: int = 1
    max_pixels: int = 4096 * 4096
    max_text_chars: int = 500
    max_texts: int = 16
    max_body_bytes: int = 32 * 1024 * 1024

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = [f.name for f in dataclasses.fields(ServeOptions)]


def options_from_args(args: dict[str, Any]) -> ServeOptions:
    """A Serve config's ``args`` mapping -> :class:`ServeOptions`; unknown keys are an error naming the
    closest one, and a missing ``checkpoint`` is one too."""
    for key in args:
        if key not in FIELDS:
            raise ConfigError(f"unknown serve option '{key}'{closest_key(key, FIELDS)}")
    if "checkpoint" not in args:
        raise ConfigError("the serve options have no 'checkpoint'; set it to a model.pt path every replica can read")
    return ServeOptions(**args)


def check_options(opts: ServeOptions) -> None:
    """Refuse values the service cannot run with, and a checkpoint refseg cannot load, in one sentence
    naming the ``refseg serve`` flag (see ``refseg serve --help``)."""
    from refseg.infer.preflight import check_checkpoint

    at_least_one = {"--replicas": opts.replicas, "--max-batch-size": opts.max_batch_size,
                    "--max-ongoing-requests": opts.max_ongoing_requests, "--max-pixels": opts.max_pixels,
                    "--max-text-chars": opts.max_text_chars, "--max-texts": opts.max_texts,
                    "--max-body-bytes": opts.max_body_bytes}
    for flag, value in at_least_one.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag} must be a whole number of at least 1, got {value!r}")
    if not isinstance(opts.max_queued_requests, int) or opts.max_queued_requests < 1:
        raise ConfigError(f"--max-queued-requests must be at least 1 (requests beyond it get 503), "
                          f"got {opts.max_queued_requests!r}")
    if not 0 <= opts.batch_wait_ms <= 10_000:
        raise ConfigError(f"--batch-wait-ms must lie between 0 and 10000, got {opts.batch_wait_ms}")
    if not 0.0 < opts.threshold < 1.0:
        raise ConfigError(f"--threshold must lie strictly between 0 and 1, got {opts.threshold}")
    if not isinstance(opts.retry_after_s, int) or opts.retry_after_s < 0:
        raise ConfigError(f"retry_after_s must be a whole number of seconds >= 0, got {opts.retry_after_s!r}")
    if opts.device not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got '{opts.device}'")
    check_checkpoint(opts.checkpoint)
