"""Training benchmarks: samples/s with 1 vs 2 Ray Train workers, and ZeRO memory per worker.

    python bench/train.py                       # both parts (~5-8 min on 2 CPU cores)
    python bench/train.py --part throughput     # tiny + r50, 1 vs 2 workers
    python bench/train.py --part memory         # r50 model states per worker: DDP vs ZeRO-1/2/3

Throughput: ``refseg.train.run_training`` end to end (Ray Data synthetic set, DeepSpeed ZeRO-2, fp32 on
CPU) for each preset and worker count, ``train.max_steps_per_epoch`` steps per epoch; the figure is
the samples/s of the last epoch (steady state: the first epoch pays process start-up and DeepSpeed's
op build). r50 runs with random weights (no hub downloads here), the same shapes as the real preset.
The scaling ratio is 2 workers / 1 worker.

Memory: in each of 2 Ray Train workers, for ZeRO stage 0 (plain data parallel, DeepSpeed's DDP
equivalent) and stages 1, 2, 3, each in fresh worker processes: build the engine (bf16, the GPU
recipe), run two steps and sum the bytes of every distinct tensor storage alive in the worker (found
through the GC, minus what was alive before the engine) after the second backward -- parameters,
gradients, optimizer state and DeepSpeed's buckets (5M elements here) -- and after its step, next to
DeepSpeed's own estimators for the same parameter count. The last line is
``... ratio=<ZeRO-2 / DDP>`` of the per-worker bytes after backward (the goal: <= 0.55).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

def bench_config(preset: str, workers: int, image_size: int, batch: int, steps: int, data_root: Path):
    """The debug config with ``preset``; r50 without hub weights (random init, same shapes)."""
    from bench.offline import offline_preset
    from refseg.config import load_config

    cfg = load_config(REPO / "configs" / "debug.yaml", [
        f"data.root={data_root}", "data.synthetic_images=200", f"data.image_size={image_size}",
        "data.augment=false", "data.cache=false",  # the streamed Ray Data path, as in BENCHMARKS.md
        f"train.num_workers={workers}", "train.cpus_per_worker=0.5",
        f"train.batch_size={batch}", "train.epochs=2", f"train.max_steps_per_epoch={steps}",
        "train.val_every=0", "train.checkpoint_every=100", "train.log_every=1000",
        "deepspeed.zero_stage=2",  # the figures in BENCHMARKS.md (configs/debug.yaml runs ZeRO-0 since session 15)
    ])
    if preset != "tiny":
        cfg.model = offline_preset(preset)
    return cfg


def throughput(a) -> dict:
    from refseg.train import run_training

    rows = {}
    with tempfile.TemporaryDirectory(prefix="refseg-bench-train-") as tmp:
        for preset, size, batch, steps in (("tiny", 96, 16, 20), ("r50", a.r50_size, a.r50_batch, a.r50_steps)):
            for workers in (1, 2):
                cfg = bench_config(preset, workers, size, batch, steps, Path(tmp) / "data")
                t0 = time.time()
                summary = run_training(cfg, Path(tmp) / f"{preset}-{workers}")
                hist = [json.loads(x) for x in (Path(tmp) / f"{preset}-{workers}" / "metrics.jsonl").read_text().splitlines()]
                rate = hist[-1]["samples_per_s"]
                rows[(preset, workers)] = rate
                print(f"{preset:5s} {size}px batch {batch}/worker  {workers} worker(s): {rate:7.2f} samples/s "
                      f"(run {time.time() - t0:.0f}s, {summary['steps']} steps)", flush=True)
    out = {}
    for preset in ("tiny", "r50"):
        out[preset] = rows[(preset, 2)] / rows[(preset, 1)]
        print(f"{preset}: scaling 2 vs 1 worker = {out[preset]:.2f}x")
    return out


# ----------------------------------------------------------------------------- memory
BUCKET = 5_000_000  # DeepSpeed reduce / all-gather bucket elements (its default 5e8 would dwarf r50)


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in this process (found through the GC)."""
    import torch

    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance() on deprecated torch proxies warns
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in tensors:
        try:
            if obj.device.type == "meta":
                continue
            st = obj.untyped_storage()
        except Exception:  # noqa: BLE001, S112 - exotic tensor subclasses: not model state
            continue
        if st.data_ptr() and st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def memory_loop(config: dict) -> None:
    """One ZeRO stage in fresh worker processes: build the engine, two bf16 steps; the tensor bytes
    alive (minus those alive before the engine existed) after the second backward and after its step."""
    import ray.train
    import torch

    from refseg.config import config_from_dict
    from refseg.losses import refseg_loss
    from refseg.train.engine import setup_engine

    torch.set_num_threads(1)
    cfg = config_from_dict(config["config"])
    gc.collect()
    before = live_tensor_bytes()
    engine, _ = setup_engine(cfg, total_steps=10, device=torch.device("cpu"))
    params = list(engine.module.parameters())
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    largest = max(getattr(p, "ds_numel", p.numel()) for p in params)
    size = cfg.data.image_size
    image = torch.randn(1, 3, size, size, dtype=torch.bfloat16)
    ids, attn = torch.randint(5, 100, (1, 8)), torch.ones(1, 8, dtype=torch.long)
    target = (torch.rand(1, size, size) > 0.9).float()
    held = {}
    for _ in range(2):  # the optimizer state exists from the first step on: measure in the second
        engine.backward(refseg_loss(engine(image, ids, attn)["logits"], target))
        gc.collect()
        held["with_grads"] = live_tensor_bytes() - before  # params + grads + optimizer state (+ buckets)
        engine.step()
    del image, params
    gc.collect()
    held["after_step"] = live_tensor_bytes() - before
    result = {"bytes": held["with_grads"], "after_step": held["after_step"], "params": n_params,
              "largest": largest}
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(json.dumps(result))
    ray.train.report({"bytes": result["bytes"]})


def estimates(n: int, largest: int, workers: int) -> dict[int, int]:
    """DeepSpeed's per-accelerator model-state estimates (bf16/fp16 mixed precision, no offload)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, ddp = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=1, cpu_offload=False)  # nothing sharded
    _, z2 = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=workers, cpu_offload=False)
    _, z3, _ = estimate_zero3_model_states_mem_needs(n, largest, num_gpus_per_node=workers, cpu_offload=False)
    # DeepSpeed has no stage-1 helper; its own breakdown (2 bf16 params + 2 bf16 grads + 16 fp32
    # grads/master/Adam) with only the 16 sharded:
    return {0: ddp, 1: int(n * (4 + 16 / workers)), 2: z2, 3: z3}


def memory(a) -> float:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from refseg.runtime import init_ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory(prefix="refseg-bench-mem-") as tmp:
        cfg = bench_config("r50", 2, a.mem_size, 1, 1, Path(tmp) / "data")
        cfg.train.precision = "bf16"
        cfg.deepspeed.extra = {"zero_optimization": {"reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET,
                                                     "stage3_prefetch_bucket_size": BUCKET}}
        init_ray()
        measured = {}
        for stage in (0, 1, 2, 3):  # fresh worker processes per stage: nothing left over from the last
            cfg.deepspeed.zero_stage = stage
            out = Path(tmp) / f"memory-{stage}.json"
            trainer = TorchTrainer(
                memory_loop, train_loop_config={"config": cfg.to_dict(), "out": str(out)},
                scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                run_config=RunConfig(name=f"mem-{stage}", storage_path=tmp), torch_config=TorchConfig(backend="gloo"),
            )
            res = trainer.fit()
            if res.error:
                raise res.error
            measured[stage] = json.loads(out.read_text())
    ray.shutdown()
    n, largest = measured[0]["params"], measured[0]["largest"]
    est = estimates(n, largest, 2)
    ddp = measured[0]["bytes"]
    print(f"r50 (random init, {n / 1e6:.1f}M params), 2 workers, bf16, buckets {BUCKET:.0e} elements; "
          "tensor bytes rank 0 holds in its 2nd step after backward (params + grads + optimizer state) "
          "and after the step:")
    print("stage           with grads MiB  bytes/param  after step MiB  DeepSpeed estimate MiB  with grads vs DDP")
    for stage, name in ((0, "DDP (ZeRO-0)"), (1, "ZeRO-1"), (2, "ZeRO-2"), (3, "ZeRO-3")):
        b, after = measured[stage]["bytes"], measured[stage]["after_step"]
        print(f"{name:14s}  {b / 2**20:14.0f}  {b / n:11.2f}  {after / 2**20:14.0f}  {est[stage] / 2**20:22.0f}  "
              f"{b / ddp:17.2f}")
    return measured[2]["bytes"] / ddp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("all", "throughput", "memory"), default="all")
    ap.add_argument("--r50-size", type=int, default=64, help="r50 image side for the throughput part")
    ap.add_argument("--r50-batch", type=int, default=2)
    ap.add_argument("--r50-steps", type=int, default=4)
    ap.add_argument("--mem-size", type=int, default=64)
    a = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    scaling = throughput(a) if a.part in ("all", "throughput") else None
    if a.part == "throughput":
        print(f"tiny_scaling={scaling['tiny']:.2f} r50_scaling={scaling['r50']:.2f} ratio={scaling['tiny']:.2f}")
        return
    ratio = memory(a)
    extra = f"tiny_scaling={scaling['tiny']:.2f} r50_scaling={scaling['r50']:.2f} " if scaling else ""
    print(f"{extra}zero2_vs_ddp={ratio:.3f} ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
