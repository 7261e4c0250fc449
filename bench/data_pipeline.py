"""Input pipeline throughput: Ray Data vs torch DataLoader vs one core, same decode+transform+tokenise.

    python bench/data_pipeline.py                      # 300 synthetic images, sizes 128 and 480
    python bench/data_pipeline.py --images 100 --sizes 128 --epochs 1

Every path runs the same per-batch function (:func:`refseg.data.ray_data.decode_batch`: decode the
JPEG and the mask, resize to S x S, normalise, tokenise one drawn sentence per ref) over the training
refs of a synthetic refer-format set with COCO-like image sizes:
  (a) Ray Data: ``build_dataset(..., train=True)`` consumed with ``iter_torch_batches`` (2 CPUs),
      for several map strategies (tasks / actor pool, CPUs per task); the default is reported last;
  (b) ``torch.utils.data.DataLoader(num_workers=2, persistent_workers=True)`` over the same ref rows;
  (c) one process, one core: a plain loop calling the same function.
Rates are steady state (one warm-up epoch first, which also pays worker start-up, printed apart).
The last line is ``... ratio=<Ray Data / DataLoader>`` for the default configuration at the first size.
"""

from __future__ import annotations

import argparse
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
    from refseg.data.ray_data import _refs_table, load_refs

    table = _refs_table(load_refs(data_cfg, "train"))
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


def opts_for(data_cfg) -> dict:
    return {"image_size": data_cfg.image_size, "keep_aspect": data_cfg.keep_aspect,
            "max_tokens": data_cfg.max_tokens, "train": True, "augment": False,
            "hflip_prob": data_cfg.hflip_prob, "override": None}


class RefBatches:
    """torch Dataset: item i = the decoded batch i (the DataLoader then just stacks nothing)."""

    def __init__(self, batches: list[dict], tokenizer_source, opts: dict) -> None:
        self.batches, self.tokenizer_source, self.opts = batches, tokenizer_source, opts

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        import torch

        from refseg.data.ray_data import decode_batch, get_tokenizer

        out = decode_batch(self.batches[i], get_tokenizer(self.tokenizer_source), self.opts)
        return {k: torch.from_numpy(v) for k, v in out.items()}


def timed_epochs(make_iter, epochs: int) -> tuple[float, float, int]:
    """(first epoch seconds, steady samples/s over ``epochs`` more, samples per epoch)."""
    t0 = time.perf_counter()
    n = sum(len(b["ref_id"]) for b in make_iter())
    first = time.perf_counter() - t0
    t0, total = time.perf_counter(), 0
    for _ in range(epochs):
        total += sum(len(b["ref_id"]) for b in make_iter())
    return first, total / (time.perf_counter() - t0), n


def bench_ray(data_cfg, text, epochs: int, compute: str, batch_size: int) -> tuple[float, float, int]:
    from refseg.data import build_dataset

    ds = build_dataset(data_cfg, "train", train=True, tokenizer_source=text, compute=compute)
    return timed_epochs(lambda: ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=2), epochs)


def bench_torch(data_cfg, text, epochs: int, rows: int) -> tuple[float, float, int]:
    import torch

    dataset = RefBatches(ref_batches(data_cfg, rows), text, opts_for(data_cfg))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=True, num_workers=2,
                                         persistent_workers=True, prefetch_factor=2)
    result = timed_epochs(lambda: iter(loader), epochs)
    del loader
    return result


def bench_single(data_cfg, text, rows: int) -> float:
    from refseg.data.ray_data import decode_batch, get_tokenizer

    batches, tok, opts = ref_batches(data_cfg, rows), get_tokenizer(text), opts_for(data_cfg)
    decode_batch(batches[0], tok, opts)  # warm
    t0 = time.perf_counter()
    n = sum(len(decode_batch(b, tok, opts)["ref_id"]) for b in batches)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 480])
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    p.add_argument("--min-side", type=int, default=320)
    p.add_argument("--max-side", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--variants", action="store_true", help="also time the non-default Ray Data strategies")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from refseg.config import DataConfig
    from refseg.data.ray_data import _map_batch_rows
    from refseg.data.synthetic import make_synthetic
    from refseg.models.presets import tiny

    text = tiny().text
    root = Path(tempfile.mkdtemp(prefix="refseg-bench-")) / "set"
    t0 = time.perf_counter()
    make_synthetic(root, num_images=args.images, seed=0, min_size=args.min_side, max_size=args.max_side)
    print(f"synthetic set: {args.images} images {args.min_side}-{args.max_side}px in {time.perf_counter() - t0:.1f}s")
    ray.init(address="local", num_cpus=2, object_store_memory=600 * 1024**2, include_dashboard=False,
             logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    ratio_line = None
    for size in args.sizes:
        cfg = DataConfig(root=str(root), image_size=size, max_tokens=20)
        rows = _map_batch_rows(size)
        single = bench_single(cfg, text, rows)
        first, dl, n = bench_torch(cfg, text, args.epochs, rows)
        print(f"[S={size}] samples/epoch={n}  (c) single core loop: {single:.0f} samples/s")
        print(f"[S={size}] (b) DataLoader(num_workers=2): {dl:.0f} samples/s (first epoch {first:.1f}s)")
        variants = [("tasks", 0.5, None), ("actors", 0.5, 2)]
        if args.variants:
            variants = [("tasks", 1.0, None), ("actors", 1.0, 2), ("tasks", 0.5, 2)] + variants
        for compute, cpus, workers in variants:
            vcfg = DataConfig(root=str(root), image_size=size, max_tokens=20, map_cpus=cpus, num_read_tasks=workers)
            first, rate, n = bench_ray(vcfg, text, args.epochs, compute, args.batch_size)
            print(f"[S={size}] (a) Ray Data {compute} map_cpus={cpus} workers={workers or 'auto'}: "
                  f"{rate:.0f} samples/s (first epoch {first:.1f}s)  vs DataLoader {rate / dl:.2f}x")
        # the default configuration last (what build_dataset does without arguments)
        first, rate, n = bench_ray(cfg, text, args.epochs, "tasks", args.batch_size)
        line = (f"[S={size}] default Ray Data {rate:.0f} samples/s, DataLoader {dl:.0f} samples/s, "
                f"single core {single:.0f} samples/s ratio={rate / dl:.2f}")
        print(line)
        ratio_line = ratio_line or line
    ray.shutdown()
    print(ratio_line)


if __name__ == "__main__":
    main()
