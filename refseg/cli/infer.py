"""The inference verbs of ``refseg``: evaluate, segment, export, export-onnx (``add_verbs(subparsers)``)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from refseg.cli.args import add_address, positive

SEGMENT_EPILOG = """\
manifest rows (JSON Lines or CSV with a header): {"id": "a1", "image": "imgs/a1.jpg", "text": "the red car"}
  image: local path (relative to the manifest's directory) or a URI pyarrow can read (s3://, gs://, ...)
outputs: OUT/masks/<id>.png, OUT/overlays/<id>.png (--overlays), OUT/results.jsonl, OUT/errors.jsonl
re-running with the same --output skips ids already in results.jsonl (also after Ctrl-C or SIGTERM).

exit status:
  0  every row was segmented (or had been in an earlier run)
  2  a usage error (missing manifest or checkpoint, bad option); nothing was segmented
  3  some rows failed: each is a line of OUT/errors.jsonl (line, id, reason); good rows are done
  130, 143  interrupted (Ctrl-C, SIGTERM): finished rows are kept; re-run the same command to continue
"""
EVALUATE_INTERRUPTED = "interrupted: metrics.json not written, re-run the same command to evaluate"
CHECKPOINT_HELP = ("model.pt, a training output dir holding model.pt, an artifact folder (refseg export) or a "
                   "DeepSpeed checkpoint dir")


def cmd_evaluate(a: argparse.Namespace) -> int:
    from refseg.infer.evaluate import evaluate, format_summary

    m = evaluate(a.checkpoint, a.data_root, a.dataset, a.split_by, a.split, image_dir=a.image_dir,
                 workers=a.workers, batch_size=a.batch_size, threshold=a.threshold, save_masks=a.save_masks,
                 at_train_res=a.at_train_res, output=a.output, address=a.address, compile=a.compile)
    print(format_summary(m))
    print(f"wrote {a.output}/metrics.json and per_sample.jsonl")
    return 0


def cmd_segment(a: argparse.Namespace) -> int:
    from refseg.infer.segment import format_summary, segment

    s = segment(a.checkpoint, a.input, a.output, workers=a.workers, batch_size=a.batch_size,
                threshold=a.threshold, overlays=a.overlays, address=a.address, compile=a.compile)
    print(format_summary(s))
    return int(s["exit_code"])


def segment_interrupted(a: argparse.Namespace) -> str:
    """Segment's interrupt line: the rows in results.jsonl are kept and a re-run skips them."""
    from refseg.infer.segment import done_ids

    n = len(done_ids(Path(a.output).expanduser() / "results.jsonl"))
    return f"interrupted: {n} done, re-run the same command to continue"


def cmd_export_onnx(a: argparse.Namespace) -> int:
    from refseg.infer.export import TOLERANCE, check_opset, export_onnx

    check_opset(a.opset)
    info = export_onnx(a.checkpoint, a.out, opset=a.opset, verify=not a.no_verify)
    print(json.dumps(info, indent=1))
    if "max_abs_diff" in info and info["max_abs_diff"] >= TOLERANCE:
        print(f"refseg: error: ONNX probabilities differ from PyTorch by {info['max_abs_diff']:.2e} "
              f"(tolerance {TOLERANCE:g}); do not use {a.out}")
        return 1
    return 0


def run_summary(checkpoint: str) -> dict | None:
    """summary.json of the training run whose output dir (or model.pt) ``checkpoint`` is, else None."""
    p = Path(checkpoint).expanduser()
    f = (p if p.is_dir() else p.parent) / "summary.json"
    if not f.is_file():
        return None
    summary = json.loads(f.read_text())
    return summary if p.is_dir() or Path(summary.get("model_path", "")).resolve() == p.resolve() else None


def cmd_export(a: argparse.Namespace) -> int:
    """``--format safetensors``: the artifact folder (config.json + model.safetensors + tokenizer files when
    needed); ``--format onnx``: OUT/model.onnx (+ model.onnx.json), as export-onnx writes it."""
    if a.format == "onnx":
        a.out = str(Path(a.out).expanduser() / "model.onnx")
        return cmd_export_onnx(a)
    from refseg.infer.predictor import resolve_checkpoint
    from refseg.infer.preflight import check_artifact_out, check_checkpoint
    from refseg.models.export import export_artifact

    check_checkpoint(a.checkpoint)
    check_artifact_out(a.out)
    with tempfile.TemporaryDirectory(prefix="refseg-export-") as tmp:  # a DeepSpeed dir is consolidated here
        out = export_artifact(resolve_checkpoint(a.checkpoint, tmp), Path(a.out).expanduser(),
                              training=run_summary(a.checkpoint))
    print(json.dumps({"path": str(out), "files": sorted(f.name for f in out.iterdir())}, indent=1))
    return 0


def _batch_job(p: argparse.ArgumentParser, batch_size: int) -> None:
    """The options evaluate and segment share."""
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--workers", type=positive(int), default=1,
                   help="inference actors (1 GPU each on a GPU cluster, else 1 CPU each)")
    p.add_argument("--batch-size", type=positive(int), default=batch_size)
    p.add_argument("--threshold", type=float, default=0.5, help="mask = probability > threshold")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model in each actor: about a minute of start-up per actor, faster "
                        "afterwards on GPUs (BENCHMARKS.md, GPU); pays off for large sets")
    add_address(p)


def add_verbs(sub: argparse._SubParsersAction) -> None:
    """Add ``evaluate``, ``segment``, ``export`` and ``export-onnx`` to the ``refseg`` parser."""
    p = sub.add_parser("evaluate", help="score a checkpoint on a refer-format split (Ray Data actors)",
                       description="Every sentence of every ref is scored at the ORIGINAL image resolution "
                                   "(predictions warped back); writes OUT/metrics.json and OUT/per_sample.jsonl.")
    _batch_job(p, 16)
    p.add_argument("--data-root", required=True, help="refer layout root (refcoco/, images/mscoco/...)")
    p.add_argument("--dataset", default="refcoco", help="refcoco | refcoco+ | refcocog")
    p.add_argument("--split-by", default="unc", help="unc | umd | google")
    p.add_argument("--split", default="val", help="val | testA | testB | test | train")
    p.add_argument("--image-dir", default=None, help="explicit COCO train2014 image dir")
    p.add_argument("--at-train-res", action="store_true",
                   help="also report LAVT's convention: GT resized (nearest) to the training resolution")
    p.add_argument("--save-masks", action="store_true", help="write OUT/masks/<ref_id>_<sent_id>.png")
    p.set_defaults(fn=cmd_evaluate, on_interrupt=lambda a: EVALUATE_INTERRUPTED)

    p = sub.add_parser("segment", help="segment a manifest of (id, image, text) rows (Ray Data actors)",
                       epilog=SEGMENT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _batch_job(p, 8)
    p.add_argument("--input", required=True, help="manifest: .jsonl or .csv with id, image, text")
    p.add_argument("--overlays", action="store_true", help="also write OUT/overlays/<id>.png")
    p.set_defaults(fn=cmd_segment, on_interrupt=segment_interrupted)

    p = sub.add_parser("export", help="export a checkpoint as an artifact folder (safetensors, the Hugging Face "
                                      "hub layout) or as ONNX",
                       description="--format safetensors writes OUT/config.json (resolved config, refseg version, "
                                   "training summary) + OUT/model.safetensors (+ tokenizer files); load it with "
                                   "Predictor.from_pretrained(OUT) or pass it as --checkpoint / train.init_from. "
                                   "--format onnx writes OUT/model.onnx + OUT/model.onnx.json.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors")
    p.add_argument("--out", required=True, help="the folder to write (new, empty, or an artifact folder to replace)")
    _onnx_options(p)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("export-onnx", help="export a checkpoint to ONNX (dynamic batch), checked with onnxruntime")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--out", required=True, help="the .onnx file to write (metadata goes to <out>.json)")
    _onnx_options(p)
    p.set_defaults(fn=cmd_export_onnx)


def _onnx_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (onnx only)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison (onnx only)")
