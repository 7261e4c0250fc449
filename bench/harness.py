"""Single-process learning harness: screen a model/recipe change in minutes before a 16-minute
``bench/learning.py`` run. Same model, loss, metrics and lr schedule as ``refseg train``; plain AdamW in
one process (no Ray Train, no DeepSpeed) on batches decoded once.

    python bench/harness.py                                   # debug config, 10 epochs, global batch 32
    python bench/harness.py "model.decoder.channels=[32,16,16,4]" --epochs 10
    python bench/harness.py --shuffle                         # control: sentences of other samples

First call: builds the debug config's synthetic set if needed and dumps 4 augmented passes over the
train split plus the val split (every sentence) to ``--data`` (~0.3 GB of uint8 for the debug config)
through the real Ray Data pipeline (``build_dataset``); epoch ``e`` then trains on pass ``e % 4``. The schedule
anneals over ``--epochs`` (warmup 20 steps, poly 0.9), so a 10-epoch harness figure is not a
10-epoch figure of a 40-epoch run. Screens only: the 4 fixed passes likely over-fit on long schedules (40
epochs: train loss 0.08, val mIoU 0.783, where a real run with fresh augmentation every epoch reaches
0.826 at train loss 0.10), so confirm any gain with ``bench/learning.py``. Seeded (``--seed``): two calls with the same arguments print the same
numbers, so differences between configs are the change plus its different random init.

``--fresh``: no dump; every epoch draws new sentences and augmentation in-process (``cache_batch`` +
``decode_batch``, the code path of a ``data.cache`` training worker) in ``--procs`` processes, and
``--workers 2`` runs BatchNorm on each half of the batch as two data-parallel workers would (the
gradient is their average, as under DeepSpeed). That is a real run's recipe without Ray or DeepSpeed,
for long schedules; ``--device cuda`` runs it on a GPU (fp32) to screen many 40-epoch recipes quickly.
``--ema D`` also validates an exponential moving average of the weights (decay D per step). Calibrated
(BENCHMARKS.md, session 8): 40 epochs, 4 seeds on an H200 averaged 0.819 val mIoU where three real CPU runs
averaged 0.814; the seed spread is +-0.03, so compare recipes over several seeds. The draws are unseeded
(as in a real run), so two calls differ by that noise.

Per epoch: train loss, val mIoU / oIoU / P@0.5 / P@0.9 and ``hit`` = mean IoU of the val samples with
IoU >= 0.5 (the boundary quality of correct selections; misses are ``1 - P@0.5``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PASSES = 4


def dump(cfg, path: Path) -> None:
    """``PASSES`` augmented train passes + the val split, decoded by the real pipeline, to ``path``."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # read when ray.data is first imported
    import ray

    from refseg import runtime
    from refseg.data import build_dataset, ensure_synthetic
    from refseg.models import load_tokenizer

    if cfg.data.synthetic:
        ensure_synthetic(cfg.data.root, cfg.data.synthetic_images, cfg.data.synthetic_seed)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    runtime.quiet_data()
    try:
        def collect(ds) -> dict:
            rows = list(ds.iter_batches(batch_size=4096, batch_format="numpy"))
            return {k: np.concatenate([r[k] for r in rows]) for k in ("image", "mask", "input_ids", "attention_mask")}

        out = {}
        tokenizer = load_tokenizer(cfg.model.text)
        train = build_dataset(cfg.data, "train", train=True, tokenizer=tokenizer)
        for e in range(PASSES):
            out |= {f"tr{e}_{k}": v for k, v in collect(train).items()}
        val_cfg = dataclasses.replace(cfg.data, shuffle_expressions=False)
        out |= {f"va_{k}": v for k, v in collect(build_dataset(val_cfg, "val", train=False,
                                                               tokenizer=tokenizer)).items()}
    finally:
        ray.shutdown()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(path)


_ROWS: dict = {}  # --fresh: the train cache rows, tokenizer and opts; set before the pool forks
_TOK = None
_OPTS: dict = {}


def fresh_rows(cfg, split: str, train: bool) -> tuple[dict, dict]:
    """The cache rows of ``split`` (decoded once, original pixels for augmented training) and their opts."""
    from refseg.data.cache import cache_batch
    from refseg.data.refs import cap_refs, load_refs, refs_table, shuffle_ref_texts
    from refseg.data.samples import sample_opts

    refs = cap_refs(load_refs(cfg.data, split), cfg.data.max_samples, train)  # as build_dataset does
    if train and cfg.data.shuffle_expressions:  # as build_dataset does (seed 0)
        refs = shuffle_ref_texts(refs, 0)
    table = refs_table(refs)
    opts = sample_opts(cfg.data, train)
    return cache_batch({c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}, opts), opts


def _decode(idx: np.ndarray) -> dict:
    from refseg.data.samples import decode_batch

    return decode_batch({k: v[idx] for k, v in _ROWS.items()}, _TOK, _OPTS)


class Fresh:
    """--fresh: every epoch a new order, sentence draw and augmentation, decoded in ``procs`` processes."""

    def __init__(self, cfg, procs: int, seed: int) -> None:
        global _ROWS, _TOK, _OPTS
        from refseg.data.samples import decode_batch
        from refseg.models import load_tokenizer

        if cfg.data.synthetic:
            from refseg.data import ensure_synthetic

            ensure_synthetic(cfg.data.root, cfg.data.synthetic_images, cfg.data.synthetic_seed)
        _TOK = load_tokenizer(cfg.model.text)
        _ROWS, _OPTS = fresh_rows(cfg, "train", True)
        val_rows, val_opts = fresh_rows(dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, shuffle_expressions=False)), "val", False)
        self.val = decode_batch(val_rows, _TOK, val_opts)
        self.n = len(_ROWS["ref_id"])
        self.rng = np.random.default_rng(seed)
        self.pool = None
        if procs > 1:
            import multiprocessing

            self.pool = multiprocessing.get_context("fork").Pool(procs)  # before any CUDA use

    def epoch(self, bs: int):
        order = self.rng.permutation(self.n)
        chunks = [order[s * bs:(s + 1) * bs] for s in range(self.n // bs)]
        return self.pool.imap(_decode, chunks) if self.pool else map(_decode, chunks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="config overrides (key=value), as for refseg train")
    p.add_argument("--config", default=str(REPO / "configs" / "debug.yaml"))
    p.add_argument("--data", default=str(REPO / "data" / "harness.npz"), help="dumped batches: made if missing, reused as is (use a new path after changing data.* overrides)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--bs", type=int, default=32, help="batch size (32 = the debug config's 2 workers x 16)")
    p.add_argument("--lr", type=float, default=None, help="default: train.lr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shuffle", action="store_true", help="pair each image with another sample's sentence")
    p.add_argument("--save", default="", help="write the final state dict here")
    p.add_argument("--fresh", action="store_true", help="new sentences and augmentation every epoch (no dump)")
    p.add_argument("--procs", type=int, default=1, help="--fresh: decoding processes")
    p.add_argument("--workers", type=int, default=1, help="BatchNorm groups per batch (2 = the debug config's workers)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (fp32 either way)")
    p.add_argument("--ema", type=float, default=0.0, help="also validate an EMA of the weights with this decay")
    a = p.parse_args()

    import torch

    from refseg.config import load_config
    from refseg.data.transforms import normalize_images
    from refseg.losses import refseg_loss
    from refseg.metrics import SegMetrics
    from refseg.models import build_model
    from refseg.train.engine import lr_lambda

    cfg = load_config(a.config, a.overrides)
    if a.shuffle:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shuffle_expressions=True))
    fresh = Fresh(cfg, a.procs, a.seed) if a.fresh else None
    if fresh is None:
        path = Path(a.data)
        if not path.is_file():
            print(f"dumping {PASSES} train passes + val to {path} ...", flush=True)
            dump(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shuffle_expressions=False)), path)
        with np.load(path) as f:
            D = {k: f[k] for k in f.files}
        val = {k: D[f"va_{k}"] for k in ("image", "mask", "input_ids", "attention_mask")}
        n = len(D["tr0_image"])
    else:
        val, n = fresh.val, fresh.n
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    dev = torch.device(a.device)
    model = build_model(cfg.model).to(dev)
    ema = None
    if a.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(a.ema), use_buffers=True)
    lr = a.lr if a.lr is not None else cfg.train.lr
    opt = torch.optim.AdamW(model.param_groups(lr, cfg.train.encoder_lr_mult, cfg.train.weight_decay), lr=lr)
    steps = n // a.bs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(steps * a.epochs, cfg.train.warmup_steps, cfg.train.poly_power))
    loss_w = (cfg.model.loss.bce_weight, cfg.model.loss.dice_weight)
    print(f"params {sum(q.numel() for q in model.parameters())}  train samples/pass {n}  val {len(val['image'])}",
          flush=True)

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(dev, non_blocking=True)

    def model_inputs(b: dict, s) -> tuple[torch.Tensor, ...]:
        """(image, ids, attn) of rows ``s`` on the device; uint8 images normalised there (as to_inputs)."""
        return normalize_images(t(b["image"][s])), t(b["input_ids"][s]), t(b["attention_mask"][s])

    def evaluate(net) -> dict:
        net.eval()
        m = SegMetrics()
        with torch.no_grad():
            for i in range(0, len(val["image"]), 64):
                s = slice(i, i + 64)
                logits = net(*model_inputs(val, s))
                m.update((logits["logits"][:, 0] > 0).cpu().numpy(), val["mask"][s] > 0.5)
        net.train()
        r, iou = m.compute(), m.ious()
        r["hit"] = float(iou[iou >= 0.5].mean()) if (iou >= 0.5).any() else 0.0
        return r

    def line(r: dict) -> str:
        return (f"val mIoU {r['miou']:.4f} oIoU {r['oiou']:.4f} P@0.5 {r['precision_at']['0.5']:.3f} "
                f"P@0.9 {r['precision_at']['0.9']:.3f} hit {r['hit']:.3f}")

    def passes(ep: int):
        if fresh is not None:
            yield from fresh.epoch(a.bs)
            return
        b = {k: D[f"tr{ep % PASSES}_{k}"] for k in ("image", "input_ids", "attention_mask", "mask")}
        if a.shuffle:
            perm = rng.permutation(n)
            b["input_ids"], b["attention_mask"] = b["input_ids"][perm], b["attention_mask"][perm]
        order = rng.permutation(n)
        for s in range(steps):
            j = order[s * a.bs:(s + 1) * a.bs]
            yield {k: v[j] for k, v in b.items()}

    t0 = time.time()
    for ep in range(a.epochs):
        losses = []
        for batch in passes(ep):
            opt.zero_grad()
            total = 0.0
            for part in np.array_split(np.arange(len(batch["image"])), a.workers):
                out = model(*model_inputs(batch, part))
                loss = refseg_loss(out["logits"], t(batch["mask"][part]).float(), *loss_w) / a.workers
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            losses.append(total)
        msg = f"epoch {ep + 1} {time.time() - t0:.0f}s loss {np.mean(losses):.4f} {line(evaluate(model))}"
        if ema is not None:
            msg += f" | ema {line(evaluate(ema))}"
        print(msg, flush=True)
    if a.save:
        torch.save(model.state_dict(), a.save)


if __name__ == "__main__":
    main()
