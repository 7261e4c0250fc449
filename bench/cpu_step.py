"""Where a CPU training step's time goes, side by side in one run (issue 26).

    python bench/cpu_step.py                                  # step + profile, debug config, 1 thread
    python bench/cpu_step.py --part step --variants model_nchw,model_cl,engine_nchw,engine_cl --reps 15
    python bench/cpu_step.py --part worker --steps 40          # Ray Train workers: data wait / fwd / bwd / step
    python bench/cpu_step.py --part profile --profile-variant model_nchw
    python bench/cpu_step.py --part concurrent --variants model_cl_fused --procs 2   # 2 workers' steps at once

Parts (the debug config's model, ``configs/debug.yaml``, batch 16 at its 96 px, random weights):

- ``step``: one process, ``--threads`` intra-op threads (a debug-config worker has 1), every variant
  built once and then timed in interleaved repetitions (variant A, B, C, A, B, C, ...), so load from
  other processes hits all of them alike; prints each variant's median ms per step and its ratio to
  the first. ``model_*``: the model alone, forward + ``refseg_loss`` + backward + AdamW over
  ``param_groups`` (no DeepSpeed); ``engine_*``: ``refseg.train.engine.setup_engine`` (DeepSpeed with
  the config's ZeRO stage, one rank, gloo) -> ``engine(...)`` -> ``engine.backward`` -> ``engine.step``,
  as ``train_epoch`` runs it. Suffixes: ``nchw`` contiguous input images (the code before issue 26),
  ``cl`` channels_last input images (``to_inputs`` since issue 26), ``fused`` fused AdamW (without it:
  the per-tensor loop CPU runs had before issue 26),
  ``compiled`` ``torch.compile`` of the model (its compile time is printed apart), ``2t`` two threads.
- ``profile``: ``torch.profiler`` tables of one variant's forward (+ loss) and of its backward + clipping
  + optimizer step, each profiled alone, ops ranked by self CPU ms per step (``--top`` rows each),
  grouped by input shapes.
- ``concurrent``: the first variant's step in one process, then in ``--procs`` processes at once (no Ray,
  no DeepSpeed, no communication): the slowdown two training workers cause each other on this host.
- ``worker``: the full path: ``num_workers`` Ray Train workers with the config's CPUs each, Ray Data
  (``data.cache``) feeding them through ``refseg.train.loop.train_batches``, the DeepSpeed engine; each
  worker times every step's phases (data wait, inputs, forward + loss, backward, optimizer step, the
  per-step all-reduce of ``train_epoch``) after a warm-up epoch, alternating the input memory format
  step by step (even steps NCHW, odd steps channels_last) so both run under the same load, and the
  training thread's CPU time (``time.thread_time``: wall minus CPU is waiting for a core or a peer)
  and its page faults per step (``train.cpu_keep_freed_mb=0`` shows glibc's default behaviour).

Measurements and the host (``lscpu`` model name) go to BENCHMARKS.md, "CPU step (issue 26)".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (runner, channels_last input, fused AdamW, torch.compile, threads or None for --threads)
VARIANTS = {
    "model_nchw": ("model", False, False, False, None),
    "model_cl": ("model", True, False, False, None),
    "model_cl_fused": ("model", True, True, False, None),
    "model_cl_compiled": ("model", True, False, True, None),
    "model_cl_2t": ("model", True, False, False, 2),
    "engine_nchw": ("engine", False, False, False, None),
    "engine_cl": ("engine", True, False, False, None),
    "engine_cl_fused": ("engine", True, True, False, None),
}


def bench_config(overrides: list[str]):
    from refseg.config import load_config

    return load_config(REPO / "configs" / "debug.yaml", overrides)


def host() -> str:
    """``lscpu``'s model name and the flags that matter for PyTorch's CPU kernels."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    keep = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{name} ({os.cpu_count()} CPUs; {' '.join(keep) or 'no avx2'})"


def inputs(cfg, batch: int, channels_last: bool):
    """(image, ids, attn, mask) of a fake batch as ``to_inputs`` makes them, NCHW or channels_last."""
    import torch

    from bench.gpu import fake_batch
    from refseg.train.engine import to_inputs

    image, ids, attn, mask = to_inputs(fake_batch(cfg, batch), torch.device("cpu"), torch.float32)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return image.contiguous(memory_format=fmt), ids, attn, mask


def make_step(cfg, name: str, batch: int):
    """(forward, backward) of one training step of variant ``name`` (see VARIANTS): ``forward()`` returns
    the loss, ``backward(loss)`` runs the backward pass, gradient clipping and the AdamW step."""
    import torch

    from refseg.losses import refseg_loss
    from refseg.models import build_model
    from refseg.train.engine import setup_engine

    runner, cl, fused, compiled, _ = VARIANTS[name]
    image, ids, attn, mask = inputs(cfg, batch, cl)
    lw = (cfg.model.loss.bce_weight, cfg.model.loss.dice_weight)
    t = cfg.train
    if runner == "engine":
        if not torch.distributed.is_initialized():
            from bench.gpu import init_dist

            init_dist(torch.device("cpu"))
        engine = setup_engine(cfg, total_steps=10_000, device=torch.device("cpu"), fused_adamw=fused)[0]
        engine.train()

        def engine_backward(loss) -> None:
            engine.backward(loss)
            engine.step()

        return lambda: refseg_loss(engine(image, ids, attn)["logits"], mask, *lw), engine_backward
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, pretrained=True).train()
    opt = torch.optim.AdamW(model.param_groups(t.lr, t.encoder_lr_mult, t.weight_decay), lr=t.lr, fused=fused)
    forward = torch.compile(model) if compiled else model

    def backward(loss) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()

    return lambda: refseg_loss(forward(image, ids, attn)["logits"], mask, *lw), backward


def step_part(cfg, a) -> dict:
    """Median ms per step of every variant, timed in interleaved repetitions."""
    import torch

    names = a.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"bench/cpu_step.py: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    steps, first = {}, {}
    for n in names:
        torch.set_num_threads(VARIANTS[n][4] or a.threads)
        forward, backward = make_step(cfg, n, a.batch)
        steps[n] = lambda f=forward, b=backward: b(f())
        t0 = time.perf_counter()
        steps[n]()  # the first step alone: compilation, DeepSpeed's buffers
        first[n] = time.perf_counter() - t0
        for _ in range(a.warmup):
            steps[n]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(a.reps):
        for n in names:
            torch.set_num_threads(VARIANTS[n][4] or a.threads)
            t0, c0 = time.perf_counter(), time.process_time()
            steps[n]()
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    torch.set_num_threads(a.threads)
    base_wall, base_cpu = statistics.median(wall[names[0]]), statistics.median(cpu[names[0]])
    out = {}
    print(f"step: batch {a.batch} at {cfg.data.image_size} px, {a.reps} interleaved reps; median wall ms and CPU ms "
          f"(this process's CPU time: robust when other processes share the cores) per step, ratios to {names[0]}")
    for n in names:
        w, c = statistics.median(wall[n]), statistics.median(cpu[n])
        out[n] = {"wall_ms": w * 1e3, "wall_ratio": w / base_wall, "cpu_ms": c * 1e3, "cpu_ratio": c / base_cpu,
                  "min_wall_ms": min(wall[n]) * 1e3, "first_step_s": first[n]}
        print(f"  {n:18s} wall {w * 1e3:8.1f} ms x{w / base_wall:5.3f} (min {min(wall[n]) * 1e3:7.1f})  "
              f"CPU {c * 1e3:8.1f} ms x{c / base_cpu:5.3f}  first step {first[n]:.1f}s", flush=True)
    return out


def profile_part(cfg, a) -> dict:
    """Per-op tables of one variant: its forward (+ loss), then its backward + clipping + optimizer step,
    each profiled alone (``--profile-steps`` times) and ranked by self CPU ms per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    name = a.profile_variant
    torch.set_num_threads(VARIANTS[name][4] or a.threads)
    forward, backward = make_step(cfg, name, a.batch)
    for _ in range(a.warmup):
        backward(forward())
    sums: dict[str, dict[tuple, list]] = {"forward": {}, "backward": {}}
    for _ in range(a.profile_steps):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            loss = forward()
        phases = [("forward", prof)]
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            backward(loss)
        phases.append(("backward", prof))
        for phase, p in phases:
            for e in p.key_averages(group_by_input_shape=True):
                row = sums[phase].setdefault((e.key, str([s for s in e.input_shapes if s])[:70]), [0.0, 0])
                row[0] += e.self_cpu_time_total / a.profile_steps / 1e3
                row[1] += e.count / a.profile_steps
    out = {}
    for phase, rows in sums.items():
        ranked = sorted(rows.items(), key=lambda kv: -kv[1][0])
        total = sum(ms for ms, _ in rows.values())
        print(f"profile {name} {phase}: {total:.1f} ms self CPU per step; top {a.top} ops (ms per step, share, "
              "calls per step, input shapes)")
        out[phase] = {"total_ms": total, "top": []}
        for (op, shapes), (ms, calls) in ranked[: a.top]:
            out[phase]["top"].append({"op": op, "ms": ms, "calls": calls, "shapes": shapes})
            print(f"  {ms:7.2f} ms {100 * ms / total:5.1f}%  {calls:5.0f}x  {op[:44]:44s} {shapes}")
    return out


def concurrent_part(a) -> dict:
    """The first variant's step alone, then in ``--procs`` processes at once (one thread each, no Ray, no
    DeepSpeed, no communication): what running N training workers side by side costs on this host by
    itself (shared caches, memory bandwidth, vCPUs that share a physical core)."""
    import subprocess

    variant = a.variants.split(",")[0]

    def launch(n: int) -> list[float]:
        with tempfile.TemporaryDirectory(prefix="refseg-bench-conc-") as tmp:
            cmd = [sys.executable, __file__, "--part", "step", "--variants", variant, "--reps", str(a.reps),
                   "--batch", str(a.batch), "--threads", "1", *a.overrides]
            procs = [subprocess.Popen([*cmd, "--json", f"{tmp}/{i}.json"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL) for i in range(n)]
            if any(p.wait() for p in procs):
                sys.exit("bench/cpu_step.py: a concurrent step process failed; run its --part step alone to see why")
            return [json.loads(Path(f"{tmp}/{i}.json").read_text())["step"][variant]["wall_ms"] for i in range(n)]

    alone = launch(1)[0]
    together = launch(a.procs)
    res = {"variant": variant, "alone_ms": alone, "together_ms": together,
           "slowdown": statistics.mean(together) / alone}
    print(f"concurrent: {variant}, batch {a.batch}, 1 thread each; median wall ms per step alone {alone:.1f}, "
          f"{a.procs} at once {' / '.join(f'{t:.1f}' for t in together)} (x{res['slowdown']:.2f}); aggregate "
          f"{a.procs * a.batch * 1e3 / statistics.mean(together):.0f} samples/s vs {a.batch * 1e3 / alone:.0f} alone")
    return res


def worker_loop(config: dict) -> None:
    """Ray Train worker: a warm-up epoch, then ``steps`` timed steps whose phases rank 0 writes as JSON."""
    import numpy as np
    import ray.train
    import torch

    from refseg.config import config_from_dict
    from refseg.losses import refseg_loss
    from refseg.train.engine import all_reduce_sum, setup_engine, to_inputs
    from refseg.train.loop import train_batches, worker_context

    cfg = config_from_dict(config["config"])
    ctx = worker_context(cfg, config["steps_per_epoch"])
    t_setup = time.perf_counter()
    engine, _ = setup_engine(cfg, total_steps=10_000, device=ctx.device)
    setup_s = time.perf_counter() - t_setup
    engine.train()
    epoch, _ = train_batches(ray.train.get_dataset_shard("train"), cfg)
    lw = (cfg.model.loss.bce_weight, cfg.model.loss.dice_weight)
    phases: dict[str, list[float]] = {k: [] for k in ("data", "inputs", "forward", "backward", "step", "sync", "total",
                                                     "cpu")}
    faults: list[int] = []  # page faults of the training thread per step (train.cpu_keep_freed_mb)
    by_format: dict[str, list[float]] = {"nchw": [], "cl": []}
    done, first_epoch_s = -ctx.steps_per_epoch, 0.0  # the first epoch warms up (fills the cache)
    t_first = time.perf_counter()
    while done < config["steps"]:
        batches = iter(epoch(None))
        for _ in range(ctx.steps_per_epoch):
            t0, c0 = time.perf_counter(), time.thread_time()
            f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            batch = next(batches)
            t1 = time.perf_counter()
            image, ids, attn, mask = to_inputs(batch, ctx.device, ctx.dtype)
            cl = done % 2 == 1
            image = image.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
            t2 = time.perf_counter()
            loss = refseg_loss(engine(image, ids, attn)["logits"], mask, *lw)
            t3 = time.perf_counter()
            engine.backward(loss)
            t4 = time.perf_counter()
            engine.step()
            t5 = time.perf_counter()
            all_reduce_sum(torch.tensor([0, 0], dtype=torch.int64))  # train_epoch's stop/out-of-batches flags
            t6, c6 = time.perf_counter(), time.thread_time()
            if done >= 0:
                faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0)
                for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t6 - t0, c6 - c0)):
                    phases[k].append(dt)
                by_format["cl" if cl else "nchw"].append(t6 - t0)
            done += 1
            if done == 0:
                first_epoch_s = time.perf_counter() - t_first
            if done >= config["steps"]:
                break
    if ctx.rank == 0:
        res = {"setup_s": setup_s, "first_epoch_s": first_epoch_s, "steps": len(phases["total"]),
               **{f"{k}_ms": 1e3 * float(np.median(v)) for k, v in phases.items()},
               "page_faults": float(np.median(faults)),
               **{f"step_{k}_ms": 1e3 * float(np.median(v)) for k, v in by_format.items()}}
        Path(config["out"]).write_text(json.dumps(res))


def worker_part(cfg, a, tmp: Path) -> dict:
    """The debug config's Ray Train workers timing their steps (see :func:`worker_loop`)."""
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from refseg.runtime import init_ray
    from refseg.train.driver import absolutize, build_datasets, prepare_environment, steps_per_epoch

    cfg = absolutize(cfg)
    cfg.train.val_every = 0
    prepare_environment(cfg)
    init_ray(num_cpus=os.cpu_count())
    world = cfg.train.num_workers
    datasets, rows = build_datasets(cfg, world)
    spe = steps_per_epoch(rows, cfg, world)
    out = tmp / "worker.json"
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"config": cfg.to_dict(), "steps_per_epoch": spe, "steps": a.steps, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=world, use_gpu=False,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(name="cpu_step", storage_path=str(tmp / "ray")),
        datasets=datasets, dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        torch_config=TorchConfig(backend="gloo"),
    )
    trainer.fit()
    res = json.loads(out.read_text())
    res["steps_per_epoch"] = spe
    res["epoch_s_estimate"] = spe * res["total_ms"] / 1e3
    print(f"worker: {world} workers x {cfg.train.cpus_per_worker} CPU, {spe} steps per epoch; engine set-up "
          f"{res['setup_s']:.1f}s, first epoch (cache fill) {res['first_epoch_s']:.1f}s; median ms per step "
          f"over {res['steps']} steps:")
    print("  " + "  ".join(f"{k} {res[f'{k}_ms']:.1f}" for k in ("data", "inputs", "forward", "backward", "step",
                                                                 "sync", "total", "cpu")))
    print(f"  page faults of the training thread per step (median): {res['page_faults']:.0f} "
          f"(train.cpu_keep_freed_mb={cfg.train.cpu_keep_freed_mb})")
    print("  (cpu: the training thread's own CPU time per step; total - cpu = time spent waiting for a core or "
          "for the other rank)")
    print(f"  NCHW steps {res['step_nchw_ms']:.1f} ms, channels_last steps {res['step_cl_ms']:.1f} ms "
          f"(x{res['step_cl_ms'] / res['step_nchw_ms']:.3f}); epoch at the median step {res['epoch_s_estimate']:.1f}s")
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="step,profile", help="step, profile, worker, concurrent (comma-separated)")
    ap.add_argument("--variants", default="model_nchw,model_cl,engine_nchw,engine_cl",
                    help=f"step variants, the first is the reference: {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (a debug-config worker has 1)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile-variant", default="engine_cl_fused", choices=list(VARIANTS))
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per worker in the worker part")
    ap.add_argument("--procs", type=int, default=2, help="processes at once in the concurrent part")
    ap.add_argument("--json", default=None, help="also write every figure to this file")
    ap.add_argument("overrides", nargs="*", help="config overrides (key=value) on configs/debug.yaml")
    a = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    from refseg.runtime import extensions_env

    os.environ.update(extensions_env())
    cfg = bench_config(a.overrides)
    res: dict = {"host": host(), "torch": torch.__version__, "threads": a.threads, "batch": a.batch}
    print(f"cpu step bench: {res['host']}, torch {torch.__version__}, {a.threads} thread(s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="refseg-bench-cpu-") as tmp:
        for part in a.part.split(","):
            if part == "step":
                res["step"] = step_part(cfg, a)
            elif part == "profile":
                res["profile"] = profile_part(cfg, a)
            elif part == "worker":
                res["worker"] = worker_part(cfg, a, Path(tmp))
            elif part == "concurrent":
                res["concurrent"] = concurrent_part(a)
            else:
                sys.exit(f"bench/cpu_step.py: unknown part {part!r}; choose from step, profile, worker, concurrent")
            if a.json:
                Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
