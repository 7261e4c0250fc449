"""Input pipeline throughput: Ray Data vs torch DataLoader vs one core, same decode+transform+tokenise.

    python bench/data_pipeline.py                      # 300 synthetic images, sizes 128 and 480 (~4 min)
    python bench/data_pipeline.py --images 600 --rounds 3 --variants

Every path runs the same per-batch function (:func:`refseg.data.samples.decode_batch`: decode the
JPEG and the mask, resize to S x S, normalise, tokenise one drawn sentence per ref) over the training
refs of a synthetic refer-format set with COCO-like image sides (320-640 px):
  (a) Ray Data: ``build_dataset(cfg.data, "train", train=True)`` with the default settings (tasks,
      one per CPU, map_cpus=0.5) on ``ray.init(num_cpus=2)``, consumed with ``iter_torch_batches(32)``;
      ``--variants`` also times other task settings (more tasks, CPUs per task);
  (b) ``torch.utils.data.DataLoader(num_workers=2, persistent_workers=True)``, one batch of 32 refs per item;
  (c) one process, one core: a plain loop calling the same function.
(a) is also timed with the task size used before session 14 (``data.map_batch_rows`` set to it).
(a) and (b) alternate for ``--rounds`` rounds of ``--epochs`` epochs after one warm-up epoch each (which
pays worker start-up, printed apart); the best round is kept, so load from other processes on the
machine hits both alike. Sizes >= 256 use the first ``--max-refs-480`` refs (time budget).
Every Ray Data epoch pays ~0.5-1 s of fixed start-up (a new streaming execution): short epochs
understate it. The last line is ``... ratio=<Ray Data / DataLoader>`` at the first size.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ref_batches(data_cfg, rows_per_batch: int) -> list[dict]:
    """The training refs as NumPy batches shaped like the ones Ray Data hands to the map."""
    from refseg.data.refs import load_refs, refs_table

    refs = load_refs(data_cfg, "train")[: data_cfg.max_samples]
    table = refs_table(refs)
    batches = []
    for i in range(0, table.num_rows, rows_per_batch):
        part = table.slice(i, rows_per_batch)
        batch = {}
        for name in part.column_names:
            values = part.column(name).to_pylist()
            if name in ("sent_ids", "sentences"):
                batch[name] = np.array([np.array(v) for v in values] + [None], dtype=object)[:-1]
            else:
                batch[name] = np.array(values, dtype=object if isinstance(values[0], str) else None)
        batches.append(batch)
    return batches


class RefBatches:
    """torch Dataset: item i = the decoded batch i (the DataLoader then just stacks nothing)."""

    def __init__(self, batches: list[dict], tokenizer, opts) -> None:
        self.batches, self.tokenizer, self.opts = batches, tokenizer, opts

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        import torch

        from refseg.data.samples import decode_batch, fast_tokenizer

        out = decode_batch(self.batches[i], fast_tokenizer(self.tokenizer), self.opts)
        return {k: torch.from_numpy(v) for k, v in out.items()}


def rate(make_iter, epochs: int) -> float:
    """Samples per second over ``epochs`` passes of ``make_iter()``."""
    t0, total = time.perf_counter(), 0
    for _ in range(epochs):
        total += sum(len(b["ref_id"]) for b in make_iter())
    return total / (time.perf_counter() - t0)


def _rows(cfg, num_refs: int) -> int:
    """Refs per map task that build_dataset chooses for ``cfg`` on this 2-CPU cluster."""
    from refseg.data.pipeline import refs_per_map_task

    return refs_per_map_task(cfg.image_size, True, num_refs, 2, cfg.map_batch_rows)


def single_core(data_cfg, tokenizer, rows: int) -> float:
    from refseg.data.samples import decode_batch, fast_tokenizer, sample_opts

    batches, opts = ref_batches(data_cfg, rows), sample_opts(data_cfg, train=True)
    tok = fast_tokenizer(tokenizer)
    decode_batch(batches[0], tok, opts)  # warm
    return rate(lambda: (decode_batch(b, tok, opts) for b in batches), 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 480])
    p.add_argument("--rounds", type=int, default=2, help="alternating DataLoader / Ray rounds (best kept)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per round")
    p.add_argument("--max-refs-480", type=int, default=320, help="refs per epoch at sizes >= 256 (time budget)")
    p.add_argument("--min-side", type=int, default=320)
    p.add_argument("--max-side", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--variants", action="store_true", help="also time other task settings")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import torch

    from refseg.config import DataConfig
    from refseg.config.presets import tiny
    from refseg.data import build_dataset, make_synthetic, sample_opts, tokenizer_spec
    from refseg.models import load_tokenizer

    tokenizer = tokenizer_spec(load_tokenizer(tiny().text))
    root = Path(tempfile.mkdtemp(prefix="refseg-bench-")) / "set"
    t0 = time.perf_counter()
    make_synthetic(root, num_images=args.images, seed=0, min_size=args.min_side, max_size=args.max_side)
    print(f"synthetic set: {args.images} images, sides {args.min_side}-{args.max_side}px "
          f"({time.perf_counter() - t0:.1f}s); {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    ray.init(address="local", num_cpus=2, object_store_memory=2 * 1024**3, include_dashboard=False,
             logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    lines = []
    for size in args.sizes:
        cfg = DataConfig(root=str(root), image_size=size, max_tokens=20,
                         max_samples=args.max_refs_480 if size >= 256 else None)
        single = single_core(cfg, tokenizer, args.batch_size)
        dataset = RefBatches(ref_batches(cfg, args.batch_size), tokenizer,  # one training batch per item
                             sample_opts(cfg, train=True))
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=True, num_workers=2,
                                             persistent_workers=True, prefetch_factor=2)
        ds = build_dataset(cfg, "train", train=True, tokenizer=tokenizer)
        ray_iter = lambda ds=ds: ds.iter_torch_batches(batch_size=args.batch_size, prefetch_batches=2)
        t0 = time.perf_counter()
        n = sum(len(b["ref_id"]) for b in loader)
        dl_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert sum(len(b["ref_id"]) for b in ray_iter()) == n
        ray_first = time.perf_counter() - t0
        # the task size before session 14 (sized as if samples were float32: 16 bytes per pixel, <= 128 refs)
        old_rows = int(min(max(8, min(128, 96e6 // (size * size * 16))), -(-n // 4)))
        old_cfg = dataclasses.replace(cfg, map_batch_rows=old_rows)
        ds_old = build_dataset(old_cfg, "train", train=True, tokenizer=tokenizer)
        old_iter = lambda ds_old=ds_old: ds_old.iter_torch_batches(batch_size=args.batch_size, prefetch_batches=2)
        assert sum(len(b["ref_id"]) for b in old_iter()) == n  # warm-up
        dl, rd, ro = [], [], []
        for _ in range(args.rounds):  # alternate, so load from other processes hits all alike
            dl.append(rate(lambda loader=loader: iter(loader), args.epochs))
            rd.append(rate(ray_iter, args.epochs))
            ro.append(rate(old_iter, args.epochs))
        print(f"[S={size}] {n} samples/epoch; first epoch (start-up included): DataLoader {dl_first:.1f}s, "
              f"Ray Data {ray_first:.1f}s")
        print(f"[S={size}] (c) single core loop:            {single:6.0f} samples/s")
        print(f"[S={size}] (b) DataLoader(num_workers=2):   {max(dl):6.0f} samples/s  rounds {[round(x) for x in dl]}")
        print(f"[S={size}] (a) Ray Data (default, tasks):   {max(rd):6.0f} samples/s  rounds {[round(x) for x in rd]}"
              f"  ({_rows(cfg, n)} refs per task)")
        print(f"[S={size}]     Ray Data, {old_rows}-ref tasks (before): {max(ro):6.0f} samples/s  rounds "
              f"{[round(x) for x in ro]}  (default / before = {max(rd) / max(ro):.2f})")
        del loader
        if args.variants:
            for cpus, workers in ((0.5, 4), (1.0, 2)):
                vcfg = DataConfig(root=str(root), image_size=size, max_tokens=20, max_samples=cfg.max_samples,
                                  map_cpus=cpus, num_read_tasks=workers)
                vds = build_dataset(vcfg, "train", train=True, tokenizer=tokenizer)
                it = lambda vds=vds: vds.iter_torch_batches(batch_size=args.batch_size, prefetch_batches=2)
                sum(len(b["ref_id"]) for b in it())  # warm-up
                r = rate(it, args.epochs)
                print(f"[S={size}]     variant tasks map_cpus={cpus} workers={workers}: {r:6.0f} samples/s "
                      f"({r / max(dl):.2f}x DataLoader)")
        lines.append(f"[S={size}] Ray Data {max(rd):.0f} samples/s, DataLoader {max(dl):.0f} samples/s, "
                     f"single core {single:.0f} samples/s, ratio={max(rd) / max(dl):.2f}")
    ray.shutdown()
    for line in lines[1:]:
        print(line)
    print(lines[0])


if __name__ == "__main__":
    main()
