"""bench/flops.py: the per-module accounting adds up to FlopCounterMode's own totals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def test_module_rows_add_up_and_scale_with_the_batch(capsys):
    from bench.flops import main

    one = main(["--preset", "tiny", "--size", "64", "--batch", "2", "--compute-batch", "2", "--dtype", "float32"])
    four = main(["--preset", "tiny", "--size", "64", "--batch", "8", "--compute-batch", "2", "--dtype", "bfloat16"])
    rows = one["modules"]
    # every counted FLOP of the forward happens inside some listed module (the loss and glue count none)
    assert sum(r["fwd_flop"] for r in rows.values()) == pytest.approx(one["fwd_flop"], rel=1e-9)
    assert sum(r["saved_bytes"] for r in rows.values()) == pytest.approx(one["saved_bytes"], rel=1e-9)
    assert one["bwd_flop"] == pytest.approx(2 * one["fwd_flop"], rel=0.25)  # conv / linear backward ~ 2x forward
    assert rows["decoder.head.0"]["res"] == "32x32"  # the sub-pixel head runs at half the input size
    # 4x the batch: 4x the FLOPs; bf16 halves the float activations (not the integer / bool ones): 2-2.5x
    assert four["fwd_flop"] == pytest.approx(4 * one["fwd_flop"], rel=1e-9)
    assert 2 * one["saved_bytes"] < four["saved_bytes"] < 2.5 * one["saved_bytes"]
    assert "per sample" in capsys.readouterr().out
