"""GPU benchmark: R101-BERT at 480x480, bf16, ZeRO-2 on one card -- training samples/s, inference
images/s and model FLOPs utilisation, plus the full Ray Train + Ray Data path on the GPU.

    python bench/gpu.py                              # every part (~4-5 min on one H100/H200)
    python bench/gpu.py --part step,infer            # engine and predictor only (no Ray)
    python bench/gpu.py --device cpu --preset tiny --size 96 --steps 3 --infer-batch 8   # smoke run

Parts (the model has random weights -- no hub downloads -- with the shapes of the real preset; token
ids come from the bundled tiny vocabulary, 20 tokens per sentence as in configs/refcoco_r101.yaml):

- ``ceiling``: a bf16 8192^3 matrix product, the card's measured matrix rate (MFU is also given
  against the 989 TFLOP/s dense bf16 datasheet figure of the H100/H200 SXM).
- ``step``: refseg's own training step (``loop.setup_engine`` -> engine(image, ids, attn) ->
  ``refseg_loss`` -> ``engine.backward`` -> ``engine.step``; DeepSpeed ZeRO-2, bf16, fused AdamW) on
  device-resident batches, so the figure is the model's, not the input pipeline's. Two variants in
  one process: ``shipped`` (``loop.to_inputs`` as the trainer calls it, cuDNN autotuning on, as
  ``loop.pick_device`` sets it) and ``plain`` (contiguous NCHW input, autotuning off). FLOPs per step
  come from ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward (matrix products,
  convolutions and attention; elementwise work is not counted, so MFU is a slight underestimate).
- ``infer``: ``Predictor.forward`` (host uint8 images + sentences in, normalised on the device, host
  probabilities out: what every ``refseg evaluate`` / ``refseg segment`` actor runs; beside it
  ``predictor_float32_input``, the host-normalised float32 input of the code before issue 25) and the
  bare model on device tensors,
  bf16 autocast; with ``--compile`` also ``torch.compile`` of the bare model and the compiled predictor
  (``refseg evaluate/segment --compile``).
- ``ray``: ``refseg.train.run_training`` with ``train.use_gpu=true`` (1 worker, NCCL, Ray Data
  streaming the synthetic refer-format set at --size px), then ``refseg.infer.evaluate`` of its
  ``model.pt`` with one GPU actor: the cluster path end to end on this card.

The last line is ``... ratio=<min(train samples/s / 150, inference images/s / 600)>`` (the goals of one
H100 for this model: >= 150 samples/s training, >= 600 images/s inference).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOAL_TRAIN, GOAL_INFER = 150.0, 600.0
DATASHEET_BF16 = 989.4e12  # H100 / H200 SXM dense bf16, FLOP/s
SENTENCES = ["the man in the red shirt on the left", "woman holding a blue umbrella", "second car from the right",
             "small dog next to the green bench", "the tallest building in the back"]


def bench_config(a, data_root: Path):
    """configs/refcoco_r101.yaml (or --preset) with random weights of the same shapes and one worker."""
    from bench.offline import offline_preset
    from refseg.config import load_config

    cfg = load_config(REPO / "configs" / "refcoco_r101.yaml", [
        f"data.root={data_root}", "data.synthetic=true", f"data.synthetic_images={a.images}",
        f"data.image_size={a.size}", f"train.batch_size={a.batch}", "train.num_workers=1",
        f"train.use_gpu={a.device == 'cuda'}", f"train.cpus_per_worker={a.cpus_per_worker}",
        "train.epochs=2", f"train.max_steps_per_epoch={a.ray_steps}", "train.warmup_steps=10",
        "train.log_every=10", "train.keep_checkpoints=1", f"train.storage_path={data_root.parent / 'ray'}",
        "eval.batch_size=32",
    ])
    cfg.model = offline_preset(a.preset)
    return cfg


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, iters: int) -> float:
    """Seconds per call after ``warmup`` calls (host clock around synchronised work)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def fake_batch(cfg, batch: int, seed: int = 0) -> dict:
    """A numpy batch shaped like the trainer's: image (B,3,S,S) uint8 pixels, ids/attn (B,L), mask (B,S,S) uint8."""
    import numpy as np

    from refseg.data.transforms import tokenize
    from refseg.models import load_tokenizer

    rng = np.random.default_rng(seed)
    S = cfg.data.image_size
    ids, attn = tokenize(load_tokenizer(cfg.model.text), [SENTENCES[i % len(SENTENCES)] for i in range(batch)],
                         cfg.data.max_tokens)
    mask = np.zeros((batch, S, S), np.uint8)
    mask[:, S // 4: S // 2, S // 3: 2 * S // 3] = 1
    return {"image": rng.integers(0, 256, (batch, 3, S, S), dtype=np.uint8), "input_ids": ids,
            "attention_mask": attn, "mask": mask}


def ceiling(device) -> dict:
    import torch

    if device.type != "cuda":
        return {}
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    dt = timed(lambda: a @ b, device, 3, 10)
    return {"matmul_bf16_tflops": 2 * 8192**3 / dt / 1e12}


def step_flops(cfg, batch: dict, device) -> float:
    """FLOPs of one forward + backward of a fresh copy of the model (matmul/conv/attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from refseg.losses import refseg_loss
    from refseg.models import build_model
    from refseg.train.engine import engine_dtype, to_inputs

    dtype = engine_dtype(cfg)
    model = build_model(cfg.model, pretrained=False).to(device=device, dtype=dtype)
    image, ids, attn, mask = to_inputs(batch, device, dtype)
    counter = FlopCounterMode(display=False)
    with counter:
        loss = refseg_loss(model(image, ids, attn)["logits"], mask, 1.0, 1.0)
        loss.backward()
    del model
    return float(counter.get_total_flops())


def step_part(cfg, a, device) -> dict:
    import torch

    from refseg.losses import refseg_loss
    from refseg.train.engine import engine_dtype, setup_engine, to_inputs

    batch = fake_batch(cfg, a.batch)
    out = {"flops_per_step": step_flops(cfg, batch, device)}
    dtype = engine_dtype(cfg)
    lw = (cfg.model.loss.bce_weight, cfg.model.loss.dice_weight)
    pinned = {k: torch.as_tensor(v).pin_memory() if device.type == "cuda" else torch.as_tensor(v)
              for k, v in batch.items()}

    def plain_inputs():
        image, ids, attn, mask = to_inputs(pinned, device, dtype)
        return image.contiguous(), ids, attn, mask

    variants = {  # name -> (inputs, cuDNN autotuning, train.compile)
        "shipped": (lambda: to_inputs(pinned, device, dtype), True, False),
        "plain": (plain_inputs, False, False),
        "compiled": (lambda: to_inputs(pinned, device, dtype), True, True),
    }
    engines = {}
    for name in a.variants.split(","):
        inputs, autotune, compiled = variants[name]
        if compiled not in engines:
            cfg.train.compile = compiled
            engines[compiled] = setup_engine(cfg, total_steps=10_000, device=device)[0]
            cfg.train.compile = False
        engine = engines[compiled]
        engine.train()

        def step(engine=engine, inputs=inputs):
            image, ids, attn, mask = inputs()
            loss = refseg_loss(engine(image, ids, attn)["logits"], mask, *lw)
            engine.backward(loss)
            engine.step()

        if device.type == "cuda":
            torch.backends.cudnn.benchmark = autotune
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()  # the first step alone: compilation / autotuning
        sync(device)
        first = time.perf_counter() - t0
        dt = timed(step, device, a.warmup, a.steps)
        row = {"step_ms": dt * 1e3, "samples_per_s": a.batch / dt,
               "achieved_tflops": out["flops_per_step"] / dt / 1e12, "first_step_s": first}
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out[name] = row
        print(f"  train {name:8s}: {row['step_ms']:7.1f} ms/step  {row['samples_per_s']:7.1f} samples/s  "
              f"{row['achieved_tflops']:6.1f} TFLOP/s  first step {first:.1f}s"
              + (f"  peak {row['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in row else ""), flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return out


def infer_part(cfg, a, device) -> dict:
    import copy

    import torch

    from refseg.data.transforms import normalize_images
    from refseg.infer.predictor import Predictor
    from refseg.models import build_model, load_tokenizer

    model = build_model(cfg.model, pretrained=False)
    fp32 = copy.deepcopy(model).to(device).eval()
    pred = Predictor(model, load_tokenizer(cfg.model.text), cfg.data.image_size, cfg.data.keep_aspect,
                     cfg.data.max_tokens, device=str(device))
    batch = fake_batch(cfg, a.infer_batch, seed=1)
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(a.infer_batch)]
    out = {}
    dt = timed(lambda: pred.forward(batch["image"], texts), device, 2, a.infer_iters)
    out["predictor"] = {"batch_ms": dt * 1e3, "images_per_s": a.infer_batch / dt}
    # the predictor before issue 25: float32 images normalised on the host (4x the bytes to the device)
    host_float = normalize_images(torch.from_numpy(batch["image"])).numpy()
    dt = timed(lambda: pred.forward(host_float, texts), device, 2, a.infer_iters)
    out["predictor_float32_input"] = {"batch_ms": dt * 1e3, "images_per_s": a.infer_batch / dt}
    if device.type == "cuda":  # the same without the pinned staging buffer (the predictor before session 5)
        pred.pin = False
        dt = timed(lambda: pred.forward(batch["image"], texts), device, 2, a.infer_iters)
        out["predictor_pageable"] = {"batch_ms": dt * 1e3, "images_per_s": a.infer_batch / dt}
        pred.pin = True
    x = normalize_images(torch.as_tensor(batch["image"]).to(device))
    if device.type == "cuda":
        x = x.to(memory_format=torch.channels_last)
    xb = x.to(next(pred.model.parameters()).dtype)  # what Predictor.forward feeds its model
    ids = torch.as_tensor(batch["input_ids"]).to(device)
    am = torch.as_tensor(batch["attention_mask"]).to(device)

    def bare(m, inp, autocast=False):
        def run():
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                return m(inp, ids, am)["logits"]
        return run

    dt = timed(bare(pred.model, xb), device, 2, a.infer_iters)
    out["model"] = {"batch_ms": dt * 1e3, "images_per_s": a.infer_batch / dt}
    if device.type == "cuda":
        # where the predictor's time went before issue 25: the host -> device copy of the float32 batch
        dt = timed(lambda: torch.from_numpy(host_float).to(device), device, 1, a.infer_iters)
        out["h2d_copy"] = {"batch_ms": dt * 1e3, "images_per_s": a.infer_batch / dt}
        # alternatives for that copy: pinned staging, bf16 made on the host, uint8 pixels (4x fewer bytes)
        host = torch.from_numpy(host_float)
        pinned = torch.empty_like(host).pin_memory()
        u8 = torch.zeros(host.shape, dtype=torch.uint8)
        for name, fn in (("h2d_pinned", lambda: pinned.copy_(host).to(device, non_blocking=True)),
                         ("h2d_bf16_host", lambda: host.to(torch.bfloat16).to(device)),
                         ("h2d_uint8", lambda: u8.to(device))):
            dt = timed(fn, device, 1, a.infer_iters)
            out[name] = {"batch_ms": dt * 1e3, "images_per_s": a.infer_batch / dt}
        # the previous predictor: fp32 weights under bf16 autocast
        dt = timed(bare(fp32.to(memory_format=torch.channels_last), x, autocast=True), device, 2, a.infer_iters)
        out["model_fp32_autocast"] = {"batch_ms": dt * 1e3, "images_per_s": a.infer_batch / dt}
    del fp32
    if a.compile:
        t0 = time.perf_counter()
        compiled = torch.compile(pred.model)
        bare(compiled, xb)()
        sync(device)
        compile_s = time.perf_counter() - t0
        dt = timed(bare(compiled, xb), device, 2, a.infer_iters)
        out["model_compiled"] = {"batch_ms": dt * 1e3, "images_per_s": a.infer_batch / dt, "compile_s": compile_s}
        # what `refseg evaluate/segment --compile` runs: the predictor (host arrays in and out) compiled
        cpred = Predictor(pred.model, pred.tokenizer, cfg.data.image_size, cfg.data.keep_aspect,
                          cfg.data.max_tokens, device=str(device), compile=True)
        t0 = time.perf_counter()
        cpred.forward(batch["image"], texts)
        compile_s = time.perf_counter() - t0
        dt = timed(lambda: cpred.forward(batch["image"], texts), device, 2, a.infer_iters)
        out["predictor_compiled"] = {"batch_ms": dt * 1e3, "images_per_s": a.infer_batch / dt, "compile_s": compile_s}
    for name, row in out.items():
        print(f"  infer {name:20s}: {row['batch_ms']:7.1f} ms/batch of {a.infer_batch}  "
              f"{row['images_per_s']:7.1f} images/s", flush=True)
    return out


def ray_part(cfg, a, tmp: Path) -> dict:
    from refseg.infer.evaluate import evaluate
    from refseg.train import run_training

    t0 = time.time()
    out = tmp / "train"
    summary = run_training(cfg, out)
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_s = time.time() - t0
    t0 = time.time()
    metrics = evaluate(summary["model_path"], cfg.data.root, cfg.data.dataset, cfg.data.split_by, "val",
                       workers=1, batch_size=32, output=tmp / "eval")
    res = {"train_wall_s": train_s, "steps": summary["steps"], "samples_per_s": hist[-1]["samples_per_s"],
           "val_miou": hist[-1].get("val_miou"), "eval_wall_s": time.time() - t0,
           "eval_samples": metrics.get("num_samples"), "eval_oiou": metrics.get("oiou"),
           "model_pt": Path(summary["model_path"]).is_file()}
    print(f"  ray train: {res['steps']} steps in {train_s:.0f}s, last epoch {res['samples_per_s']:.1f} samples/s "
          f"(Ray Data streamed, 1 worker); evaluate: {res['eval_samples']} samples in {res['eval_wall_s']:.0f}s",
          flush=True)
    return res


def init_dist(device) -> None:
    """A one-process torch.distributed group (what Ray Train sets up for each worker)."""
    import deepspeed

    from refseg.runtime import local_env

    local_env()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="ceiling,step,infer,ray")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--preset", default="r101")
    ap.add_argument("--size", type=int, default=480)
    ap.add_argument("--batch", type=int, default=16, help="training batch per GPU (the recipe's 16)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--infer-batch", type=int, default=64)
    ap.add_argument("--infer-iters", type=int, default=10)
    ap.add_argument("--variants", default="shipped,plain", help="training-step variants: shipped, plain, compiled")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the bare model (infer)")
    ap.add_argument("--images", type=int, default=200, help="synthetic images for the ray part")
    ap.add_argument("--ray-steps", type=int, default=30, help="steps per epoch in the ray part (2 epochs)")
    ap.add_argument("--cpus-per-worker", type=float, default=8)
    ap.add_argument("--json", default=None, help="also write every figure to this file")
    a = ap.parse_args(argv)
    parts = set(a.part.split(","))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if a.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from refseg.runtime import extensions_env

    os.environ.update(extensions_env())
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: CUDA is not available here; run it on a GPU node or pass --device cpu")
    device = torch.device(a.device, 0) if a.device == "cuda" else torch.device("cpu")
    card = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    res: dict = {"card": card, "torch": torch.__version__, "preset": a.preset, "size": a.size, "batch": a.batch}
    print(f"gpu bench: {card}, torch {torch.__version__}, {a.preset} at {a.size}px, bf16, ZeRO-2, "
          f"batch {a.batch} (train) / {a.infer_batch} (infer)", flush=True)
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="refseg-bench-gpu-") as tmp:
        cfg = bench_config(a, Path(tmp) / "data")
        if "ceiling" in parts:
            res["ceiling"] = ceiling(device)
            if res["ceiling"]:
                print(f"  bf16 matmul 8192^3: {res['ceiling']['matmul_bf16_tflops']:.0f} TFLOP/s", flush=True)
        for part in [p for p in a.part.split(",") if p != "ceiling"]:  # a failing part is reported, the rest run
            try:
                if part == "step":
                    init_dist(device)
                    res["step"] = step_part(cfg, a, device)
                elif part == "infer":
                    res["infer"] = infer_part(cfg, a, device)
                else:
                    res["ray"] = ray_part(cfg, a, Path(tmp))
            except Exception as e:  # noqa: BLE001 - a benchmark reports every part it can
                traceback.print_exc()
                failed.append(f"{part}: {type(e).__name__}: {e}")
            if a.json:  # after every part: a run cut short keeps what it measured
                Path(a.json).write_text(json.dumps(res, indent=1))
    if "shipped" in res.get("step", {}):
        shipped = res["step"]["shipped"]
        peak = res.get("ceiling", {}).get("matmul_bf16_tflops")
        res["mfu_datasheet"] = shipped["achieved_tflops"] * 1e12 / DATASHEET_BF16
        res["mfu_measured_peak"] = shipped["achieved_tflops"] / peak if peak else None
        print(f"  MFU: {100 * res['mfu_datasheet']:.1f}% of 989 TFLOP/s"
              + (f", {100 * res['mfu_measured_peak']:.1f}% of the measured {peak:.0f}" if peak else ""))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    for f in failed:
        print(f"FAILED {f}")
    train = max((r["samples_per_s"] for r in res.get("step", {}).values() if isinstance(r, dict)), default=None)
    # the predictor as `refseg evaluate/segment` run it: eager, or with --compile when that was measured
    infer = max((res.get("infer", {}).get(k, {}).get("images_per_s") or 0 for k in ("predictor", "predictor_compiled")),
                default=0) or None
    ratios = [r for r in (train and train / GOAL_TRAIN, infer and infer / GOAL_INFER) if r]
    if ratios:
        print(f"gpu: train {train or 0:.1f} samples/s (best variant; goal {GOAL_TRAIN:.0f}), predictor {infer or 0:.1f} "
              f"images/s (best of eager / --compile; goal {GOAL_INFER:.0f}) ratio={min(ratios):.2f}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
