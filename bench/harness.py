"""Single-process learning harness: screen a model/recipe change in minutes before a 16-minute
``bench/learning.py`` run. Same model, loss, metrics and lr schedule as ``refseg train``; plain AdamW in
one process (no Ray Train, no DeepSpeed) on batches decoded once.

    python bench/harness.py                                   # debug config, 10 epochs, global batch 32
    python bench/harness.py "model.decoder.channels=[32,16,16,4]" --epochs 10
    python bench/harness.py --shuffle                         # control: sentences of other samples

First call: builds the debug config's synthetic set if needed and dumps 4 augmented passes over the
train split plus the val split (every sentence) to ``--data`` (~1.2 GB of float32 for the debug config)
through the real Ray Data pipeline (``build_dataset``); epoch ``e`` then trains on pass ``e % 4``. The schedule
anneals over ``--epochs`` (warmup 20 steps, poly 0.9), so a 10-epoch harness figure is not a
10-epoch figure of a 40-epoch run. Screens only: the 4 fixed passes likely over-fit on long schedules (40
epochs: train loss 0.08, val mIoU 0.783, where a real run with fresh augmentation every epoch reaches
0.826 at train loss 0.10), so confirm any gain with ``bench/learning.py``. Seeded (``--seed``): two calls with the same arguments print the same
numbers, so differences between configs are the change plus its different random init.

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

    from refseg import raylog
    from refseg.data import build_dataset, ensure_synthetic

    if cfg.data.synthetic:
        ensure_synthetic(cfg.data.root, cfg.data.synthetic_images, cfg.data.synthetic_seed)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    raylog.quiet_data()
    try:
        def collect(ds) -> dict:
            rows = list(ds.iter_batches(batch_size=4096, batch_format="numpy"))
            return {k: np.concatenate([r[k] for r in rows]) for k in ("image", "mask", "input_ids", "attention_mask")}

        out = {}
        train = build_dataset(cfg.data, "train", train=True, tokenizer_source=cfg.model.text)
        for e in range(PASSES):
            out |= {f"tr{e}_{k}": v for k, v in collect(train).items()}
        val_cfg = dataclasses.replace(cfg.data, shuffle_expressions=False)
        out |= {f"va_{k}": v for k, v in collect(build_dataset(val_cfg, "val", train=False,
                                                               tokenizer_source=cfg.model.text)).items()}
    finally:
        ray.shutdown()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(path)


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
    a = p.parse_args()

    import torch

    from refseg.config import load_config
    from refseg.losses import refseg_loss
    from refseg.metrics import SegMetrics
    from refseg.models import build_model
    from refseg.train.ds_config import lr_lambda

    cfg = load_config(a.config, a.overrides)
    path = Path(a.data)
    if not path.is_file():
        print(f"dumping {PASSES} train passes + val to {path} ...", flush=True)
        dump(cfg, path)
    with np.load(path) as f:
        D = {k: f[k] for k in f.files}
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    model = build_model(cfg.model)
    lr = a.lr if a.lr is not None else cfg.train.lr
    opt = torch.optim.AdamW(model.param_groups(lr, cfg.train.encoder_lr_mult, cfg.train.weight_decay), lr=lr)
    n = len(D["tr0_image"])
    steps = n // a.bs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(steps * a.epochs, cfg.train.warmup_steps, cfg.train.poly_power))
    loss_w = (cfg.model.loss.bce_weight, cfg.model.loss.dice_weight)
    print(f"params {sum(q.numel() for q in model.parameters())}  train samples/pass {n}  val {len(D['va_image'])}",
          flush=True)

    def evaluate() -> dict:
        model.eval()
        m = SegMetrics()
        with torch.no_grad():
            for i in range(0, len(D["va_image"]), 64):
                s = slice(i, i + 64)
                logits = model(*(torch.from_numpy(D[f"va_{k}"][s]) for k in ("image", "input_ids", "attention_mask")))
                m.update((logits["logits"][:, 0] > 0).numpy(), D["va_mask"][s] > 0.5)
        model.train()
        r, iou = m.compute(), m.ious()
        r["hit"] = float(iou[iou >= 0.5].mean()) if (iou >= 0.5).any() else 0.0
        return r

    t0 = time.time()
    for ep in range(a.epochs):
        img, ids, att, msk = (D[f"tr{ep % PASSES}_{k}"] for k in ("image", "input_ids", "attention_mask", "mask"))
        if a.shuffle:
            perm = rng.permutation(n)
            ids, att = ids[perm], att[perm]
        order, losses = rng.permutation(n), []
        for s in range(steps):
            j = order[s * a.bs:(s + 1) * a.bs]
            out = model(torch.from_numpy(img[j]), torch.from_numpy(ids[j]), torch.from_numpy(att[j]))
            loss = refseg_loss(out["logits"], torch.from_numpy(msk[j]), *loss_w)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
        r = evaluate()
        print(f"epoch {ep + 1} {time.time() - t0:.0f}s loss {np.mean(losses):.4f} val mIoU {r['miou']:.4f} "
              f"oIoU {r['oiou']:.4f} P@0.5 {r['precision_at']['0.5']:.3f} P@0.9 {r['precision_at']['0.9']:.3f} "
              f"hit {r['hit']:.3f}", flush=True)
    if a.save:
        torch.save(model.state_dict(), a.save)


if __name__ == "__main__":
    main()
