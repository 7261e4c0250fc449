"""Where a training step's FLOPs and activation memory go, module by module (issue 25), without a GPU.

    python bench/flops.py                                   # r101 at 480 px, batch 16 (the GPU recipe)
    python bench/flops.py --preset tiny --size 96           # the debug config's model
    python bench/flops.py --preset r101 --size 480 model.decoder.channels=[128,64,32]   # a decoder variant
    python bench/flops.py --json flops.json                 # also write every figure

One forward + loss + backward of the preset's model (random weights of the real shapes: no downloads)
runs on the CPU in float32 with ``--compute-batch`` samples (2: R101-BERT at 480 px takes seconds); every
figure is per sample and is scaled to ``--batch``. One row per module that ran, down to ``--depth``
levels of names (3: ``vision.body.layer3``, ``decoder.stages.2``, ``text.bert.encoder``, ...), and a
parent's own work beside its children as ``"<parent> (own)"``, so the rows add up to the totals:

- ``fwd GFLOP``: ``torch.utils.flop_counter.FlopCounterMode``'s count of the module's forward (matrix
  products, convolutions, attention -- the count ``bench/gpu.py`` divides by the step time for MFU;
  elementwise ops, norms and resampling are not counted, which is why the activation column matters).
  The backward is given as a total only: PyTorch's module tracker charges backward ops to whichever
  module's backward hook fired last, so per-module backward figures would be wrong; a convolution's or
  a linear layer's backward costs twice its forward;
- ``act MiB``: bytes the module's forward saves for the backward pass (every tensor autograd packs,
  through ``torch.autograd.graph.saved_tensors_hooks``, each storage once, weights excluded, at
  ``--dtype``'s width, charged to the innermost listed module that was running), i.e. the activation
  memory of a training step. A module with many saved bytes per FLOP (``FLOP/byte``) is
  bandwidth-bound on a GPU (norms, upsampling, high-resolution decoder stages);
- ``out res``: the spatial size of the module's (first) output, which says which stride it runs at.

Totals are per step (``--batch`` samples) and per sample. Numbers are exact for the given shapes; they
do not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def account(model, image, ids, attn, mask, depth: int, act_bytes: int) -> tuple[dict[str, dict], float, float, float]:
    """Run forward + loss + backward under the counters -> (rows by module name, total fwd FLOP,
    total bwd FLOP, total saved bytes)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from refseg.losses import refseg_loss

    names = {m: n for n, m in model.named_modules() if n and n.count(".") < depth}
    rows: dict[str, dict] = defaultdict(lambda: {"fwd_flop": 0.0, "saved_bytes": 0.0, "res": ""})
    stack: list[str] = []

    def pre(mod, _args):
        stack.append(names[mod])

    def post(mod, _args, out):
        stack.pop()
        t = out if isinstance(out, torch.Tensor) else next(
            (v for v in (out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else [])
             if isinstance(v, torch.Tensor)), None)
        if t is not None and t.dim() == 4 and not rows[names[mod]]["res"]:
            rows[names[mod]]["res"] = f"{t.shape[-2]}x{t.shape[-1]}"

    handles = [m.register_forward_pre_hook(pre) for m in names] + [m.register_forward_hook(post) for m in names]
    seen: set[int] = set()

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        key = t.untyped_storage().data_ptr()  # a tensor saved by several ops (or as views) is stored once
        if key not in seen and key not in params:  # weights are not activations
            seen.add(key)
            size = act_bytes if t.is_floating_point() else t.element_size()
            rows[stack[-1] if stack else "(loss / glue)"]["saved_bytes"] += t.numel() * size
        return t

    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = refseg_loss(model(image, ids, attn)["logits"], mask, 1.0, 1.0)
        fwd = float(counter.get_total_flops())
        for name, ops in counter.get_flop_counts().items():
            name = name.partition(".")[2]  # "RefSegModel.decoder.stages.2" -> "decoder.stages.2"
            if name in names.values():
                rows[name]["fwd_flop"] = float(sum(ops.values()))
        loss.backward()
    bwd = float(counter.get_total_flops()) - fwd
    for h in handles:
        h.remove()
    total_saved = sum(r["saved_bytes"] for r in rows.values())
    return dict(rows), fwd, bwd, total_saved


def own_rows(rows: dict[str, dict]) -> dict[str, dict]:
    """Rows that do not overlap: every leaf module as it is, and a parent's own work (its FLOPs minus its
    listed children's -- FlopCounterMode counts a module with its children; the saved bytes were charged
    to the innermost module already) as ``"<parent> (own)"`` when it has any. They add up to the totals."""
    out = {}
    for name, r in rows.items():
        inside = [o for o in rows if o.startswith(name + ".")]  # (containers that never ran have no row)
        kids = [o for o in inside if not any(o.startswith(p + ".") for p in inside)]
        if not kids:
            out[name] = r
            continue
        own = {**r, "fwd_flop": r["fwd_flop"] - sum(rows[k]["fwd_flop"] for k in kids)}
        if own["fwd_flop"] > 0 or own["saved_bytes"] > 0:
            out[f"{name} (own)"] = own
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="r101", choices=["r101", "r50", "tiny"])
    ap.add_argument("--size", type=int, default=480)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=20, help="sentence length in tokens (refcoco_r101.yaml: 20)")
    ap.add_argument("--depth", type=int, default=3, help="module name depth to account to (vision.body.layer3 = 3)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="activation dtype (bytes saved); FLOPs do not depend on it")
    ap.add_argument("--compute-batch", type=int, default=2,
                    help="samples actually run on the CPU; the figures are scaled to --batch")
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*", help="model.* overrides (key=value), e.g. model.decoder.channels=[128,64,32]")
    a = ap.parse_args(argv)
    import torch

    from bench.offline import offline_preset
    from refseg.config import parse_override
    from refseg.models import build_model

    model_cfg = offline_preset(a.preset)
    for o in a.overrides:  # model.* settings on top of the offline preset, parsed as `refseg train` parses them
        path, value = parse_override(o)
        if path[0] != "model" or len(path) < 2:
            sys.exit(f"bench/flops.py: override {o!r} is not model.<setting>=<value>")
        _set(model_cfg, path[1:], value)
    torch.manual_seed(0)
    model = build_model(model_cfg, pretrained=False).train()
    n = a.compute_batch
    image = torch.randn(n, 3, a.size, a.size).contiguous(memory_format=torch.channels_last)
    ids = torch.randint(1, 400, (n, a.tokens))  # < the bundled vocab's 409 ids (offline_preset's tokenizer)
    attn = torch.ones(n, a.tokens, dtype=torch.long)
    mask = (torch.rand(n, a.size, a.size) > 0.7).float()
    act_bytes = 2 if a.dtype == "bfloat16" else 4
    rows, fwd, bwd, saved = account(model, image, ids, attn, mask, a.depth, act_bytes)
    scale = a.batch / n  # FLOPs and activations are per sample: exact multiples of the batch
    for r in rows.values():
        for k in ("fwd_flop", "saved_bytes"):
            r[k] *= scale
    fwd, bwd, saved = fwd * scale, bwd * scale, saved * scale
    params = sum(p.numel() for p in model.parameters())
    print(f"flops: preset {a.preset} ({params / 1e6:.1f}M parameters), {a.size}x{a.size}, batch {a.batch}, "
          f"{a.tokens} tokens, activations in {a.dtype}; per step: forward {fwd / 1e9:.1f} GFLOP, backward "
          f"{bwd / 1e9:.1f} GFLOP, saved for backward {saved / 2**20:.0f} MiB; per sample "
          f"{(fwd + bwd) / a.batch / 1e9:.2f} GFLOP, {saved / a.batch / 2**20:.1f} MiB")
    print(f"{'module':34s} {'out res':>9s} {'fwd GFLOP':>10s} {'fwd %':>6s} {'act MiB':>9s} "
          f"{'act %':>6s} {'FLOP/byte':>9s}")
    rows = own_rows(rows)
    order = sorted(rows, key=lambda n: -(rows[n]["saved_bytes"] + 1e-9 * rows[n]["fwd_flop"]))
    for n in order:
        r = rows[n]
        flop = r["fwd_flop"]
        if not flop and not r["saved_bytes"]:
            continue
        print(f"{n:34s} {r['res']:>9s} {flop / 1e9:10.2f} {100 * flop / max(fwd, 1):5.1f}% {r['saved_bytes'] / 2**20:9.1f} "
              f"{100 * r['saved_bytes'] / max(saved, 1):5.1f}% "
              + (f"{flop / r['saved_bytes']:9.0f}" if r["saved_bytes"] else f"{'-':>9s}"))
    out = {"preset": a.preset, "size": a.size, "batch": a.batch, "tokens": a.tokens, "dtype": a.dtype,
           "overrides": a.overrides, "params": params, "fwd_flop": fwd, "bwd_flop": bwd, "saved_bytes": saved,
           "modules": {n: rows[n] for n in order}}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


def _set(obj, path: list[str], value) -> None:
    for p in path[:-1]:
        obj = getattr(obj, p)
    if not hasattr(obj, path[-1]):
        sys.exit(f"bench/flops.py: unknown model setting {'.'.join(path)!r}")
    setattr(obj, path[-1], value)


if __name__ == "__main__":
    main()
