"""The segmentation service over real HTTP: parity with Predictor, bad input, the batch endpoint, backpressure.

One Serve application per module (``service``) on a free loopback port inside the session's Ray
instance; ``start_service`` is shared with tests/test_serve_page.py.
"""

from __future__ import annotations

import base64
import hashlib
import io
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from test_predictor import tiny_checkpoint

MAX_PIXELS = 200 * 200  # the synthetic images are 96-192 px a side


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(ckpt: Path, **options) -> str:
    """Serve ``ckpt`` on a free loopback port; the base URL (``http://127.0.0.1:PORT/``)."""
    from refseg.serve.options import ServeOptions, check_options
    from refseg.serve.run import deploy

    opts = ServeOptions(checkpoint=str(ckpt), **options)
    check_options(opts)
    return deploy(opts, "127.0.0.1", free_port())


def stop_service() -> None:
    from ray import serve

    serve.shutdown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def url(ray_session, ckpt) -> str:
    base = start_service(ckpt, max_batch_size=4, batch_wait_ms=20, max_ongoing_requests=2,
                         max_queued_requests=2, max_pixels=MAX_PIXELS)
    yield base
    stop_service()


@pytest.fixture(scope="module")
def predictor(ckpt):
    from refseg.infer import Predictor

    return Predictor.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def samples(synthetic_root) -> list[dict]:
    from refseg.data import load_split

    return load_split(synthetic_root, "refcoco", "unc", "val")[:3]


def rle_mask(out: dict) -> np.ndarray:
    from refseg.data.masks import rle_to_mask

    return rle_to_mask(out["mask"]).astype(bool)


def post_form(url: str, image: bytes, text: str | None = "the left circle", path: str = "v1/segment",
              **kw) -> requests.Response:
    data = {} if text is None else {"text": text}
    return requests.post(url + path, files={"image": ("img.jpg", image, "image/jpeg")}, data=data, timeout=60, **kw)


def test_served_mask_equals_predictor_mask(url, predictor, samples):
    for s in samples:
        data = Path(s["image_path"]).read_bytes()
        expected = predictor.predict(s["image_path"], s["sentence"])
        r = post_form(url, data, s["sentence"])
        assert r.status_code == 200, r.text
        out = r.json()
        h, w = expected.mask.shape
        assert (out["width"], out["height"]) == (w, h) and out["mask"]["size"] == [h, w]
        np.testing.assert_array_equal(rle_mask(out), expected.mask)
        assert out["score"] == pytest.approx(float(expected.prob[expected.mask].mean()), abs=1e-5)
        assert out["latency_ms"] > 0
        if getattr(expected, "no_target_prob", None) is not None:
            assert out["no_target_prob"] == pytest.approx(float(expected.no_target_prob), abs=1e-5)
        # the same through JSON + base64, and as a PNG
        js = requests.post(url + "v1/segment?attn=1", timeout=60,
                           json={"image": base64.b64encode(data).decode(), "text": s["sentence"]}).json()
        np.testing.assert_array_equal(rle_mask(js), expected.mask)
        np.testing.assert_allclose(np.asarray(js["attn"]["values"]).reshape(js["attn"]["size"]), expected.attn,
                                   atol=1e-3)
        png = post_form(url, data, s["sentence"], path="v1/segment?format=png")
        assert png.headers["content-type"] == "image/png"
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png.content))) == 255, expected.mask)


def test_batch_endpoint_gives_each_phrase_its_own_mask(url, predictor, samples):
    s = samples[0]
    texts = ["the left circle", "the big red square", s["sentence"]]
    data = Path(s["image_path"]).read_bytes()
    r = requests.post(url + "v1/segment/batch", files={"image": ("a.jpg", data, "image/jpeg")},
                      data={"text": texts}, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [x["text"] for x in out["results"]] == texts
    for text, res in zip(texts, out["results"]):
        np.testing.assert_array_equal(rle_mask(res), predictor.predict(s["image_path"], text).mask)
    js = requests.post(url + "v1/segment/batch", timeout=60,
                       json={"image": base64.b64encode(data).decode(), "texts": texts[:2]}).json()
    assert [x["text"] for x in js["results"]] == texts[:2]


def test_healthz_and_model_info(url, ckpt):
    assert requests.get(url + "healthz", timeout=30).json() == {"status": "ok"}
    info = requests.get(url + "v1/model", timeout=30).json()
    import refseg

    assert info["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert info["refseg_version"] == refseg.__version__
    assert info["preset"] == "tiny" and info["config"]["data"]["image_size"] == info["image_size"] == 64
    assert info["max_batch_size"] == 4


def bad_requests(url: str, image: bytes) -> dict[str, Callable[[], requests.Response]]:
    """Every kind of bad input of the API, each a function that sends it."""
    big = io.BytesIO()
    Image.new("RGB", (300, 300), (9, 9, 9)).save(big, format="PNG")
    return {
        "not an image": lambda: post_form(url, b"this is a text file, not an image"),
        "truncated jpeg": lambda: post_form(url, image[: len(image) // 2]),
        "too many pixels": lambda: post_form(url, big.getvalue()),
        "empty text": lambda: post_form(url, image, "   "),
        "over-long text": lambda: post_form(url, image, "the dog " * 100),
        "wrong content type": lambda: requests.post(url + "v1/segment", data=b"hello", timeout=30,
                                                    headers={"Content-Type": "text/plain"}),
        "missing text field": lambda: post_form(url, image, None),
        "missing image field": lambda: requests.post(url + "v1/segment", json={"text": "the dog"}, timeout=30),
        "invalid base64": lambda: requests.post(url + "v1/segment", json={"image": "not*base64!", "text": "a"},
                                                timeout=30),
        "bad json": lambda: requests.post(url + "v1/segment", data=b"{oops", timeout=30,
                                          headers={"Content-Type": "application/json"}),
        "unknown format": lambda: post_form(url, image, path="v1/segment?format=gif"),
    }


def test_bad_input_gets_one_sentence_4xx_and_the_server_keeps_serving(url, samples):
    image = Path(samples[0]["image_path"]).read_bytes()
    expected_status = {"too many pixels": 413, "wrong content type": 415}
    errors = {}
    for name, send in bad_requests(url, image).items():
        r = send()
        assert r.status_code == expected_status.get(name, 400), (name, r.status_code, r.text)
        errors[name] = msg = r.json()["error"]
        assert msg and "\n" not in msg and "Traceback" not in msg and len(msg) < 300, (name, msg)
        good = post_form(url, image)
        assert good.status_code == 200, (name, good.text)
    assert "not an image" in errors["not an image"]
    assert "truncated" in errors["truncated jpeg"] and "base64" in errors["invalid base64"]
    assert "300x300" in errors["too many pixels"] and "'text'" in errors["missing text field"]


def test_a_burst_beyond_the_limits_gets_503_with_retry_after(url, samples):
    image = Path(samples[0]["image_path"]).read_bytes()
    t0 = time.monotonic()
    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda _: post_form(url, image), range(48)))
    elapsed = time.monotonic() - t0
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0, codes
    assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)
    assert elapsed < 60
    assert post_form(url, image).status_code == 200  # and it recovers


def test_serve_yaml_is_a_valid_serve_config_with_known_args():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from refseg.config import ConfigError
    from refseg.serve.options import options_from_args

    doc = yaml.safe_load((Path(__file__).parents[1] / "cluster" / "serve.yaml").read_text())
    app = ServeDeploySchema.model_validate(doc).applications[0]
    assert app.import_path == "refseg.serve.app:build_app"
    assert options_from_args(app.args).device == "cuda"
    with pytest.raises(ConfigError, match="unknown serve option 'max_batchsize'; did you mean 'max_batch_size'"):
        options_from_args({**app.args, "max_batchsize": 4})


def test_cli_refuses_bad_flags_before_ray_starts(tmp_path, capsys):
    from refseg.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path), "--threshold", "1.5"]) == 2
    assert "--threshold must lie strictly between 0 and 1" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_serves_until_ctrl_c(ckpt, tmp_path):
    """`refseg serve` in a subprocess (its own local Ray instance): healthz answers, Ctrl-C stops it (130)."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "-m", "refseg.cli", "serve", "--checkpoint", str(ckpt),
                             "--port", str(port), "--max-batch-size", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        line = proc.stdout.readline()  # blocks until the app is up (or the process died)
        assert f"http://127.0.0.1:{port}/" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json() == {"status": "ok"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 130
        err = proc.stderr.read()
        assert "refseg: stopped serving" in err and "Traceback" not in err, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
