"""bench/cost_model.py against hand-computed counts, and its hook in bench_linear_ce.py."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _model():
    sys.path.insert(0, str(BENCH))
    import cost_model

    return cost_model


def test_floor_and_fused_atomics_match_hand_counts():
    cm = _model()
    result = cm.model()["variants"]
    n, h, v = 16384, 4096, 128256
    # three matmuls of 2·N·H·V FLOPs at 788 TFLOP/s: 65.5 ms on either GPU
    floor = 6 * n * h * v / 788e12 * 1e3
    assert abs(result["ours_ce"]["floor_ms_h200"] - floor) < 0.01 and abs(floor - 65.5) < 0.1
    # fused backward: grid 256 x 1002; every program adds a [64, H] and a [128, H] fp32 tile
    gn, gv = math.ceil(n / 64), math.ceil(v / 128)
    assert (gn, gv) == (256, 1002)
    assert result["fused_ce"]["atomic_bytes"] == 4 * (gv * n * h + gn * v * h)  # 806.9 GB
    assert abs(result["fused_ce"]["atomic_bytes"] / 1e9 - 806.9) < 0.1
    # its d input atomics alone (269 GB read + written at 4.8 TB/s) bound the backward below by 112 ms
    fused_bwd = next(k for k in result["fused_ce"]["kernels"] if k["name"].startswith("fused backward"))
    assert fused_bwd["ms_h200"] >= 2 * 4 * gv * n * h / 4.8e12 * 1e3 - 0.01


def test_chunked_variants_do_no_atomics_and_ce_is_near_the_floor():
    cm = _model()
    result = cm.model()["variants"]
    for name in ("ours_ce", "ours_ce_irm", "ours_penalty"):
        row = result[name]
        assert row["atomic_bytes"] == 0
        assert {"flops", "hbm_bytes", "atomic_bytes", "predicted_ms_h100", "predicted_ms_h200", "floor_ms_h100",
                "floor_ms_h200"} <= set(row)
        assert set(row["e2e_8b"]) >= {"predicted_ms_h200", "floor_ms_h200"}
        # nothing is cheaper than the floor: at least 3 matmuls' FLOPs
        assert row["predicted_ms_h200"] >= row["floor_ms_h200"]
    # the gradient formed in the forward: 3 matmuls, within 1.2x the floor at the bench shape
    assert result["ours_ce"]["over_floor_h200"] <= 1.2 and result["ours_ce"]["over_floor_h100"] <= 1.2
    # recompute in backward (upstream unknown in the forward) costs a 4th matmul, unless one chunk holds every
    # row: its logits are kept (the e2e shape)
    assert result["ours_ce_irm"]["flops"] >= 8 * 16384 * 4096 * 128256
    assert result["ours_ce_irm"]["e2e_8b"]["flops"] < 7 * 2048 * 4096 * 128256
    assert result["fused_ce"]["predicted_ms_h200"] > 2 * result["ours_ce"]["predicted_ms_h200"]


def test_roofline_of_one_kernel():
    cm = _model()
    k = cm.Kernel("x", flops=788e12 * 1e-3, hbm_bytes=4.8e12 * 2e-3)  # 1 ms of compute, 2 ms of memory
    assert abs(k.ms(cm.GPUS["h200"]) - 2.0) < 1e-9
    k = cm.Kernel("y", flops=788e12 * 3e-3, atomic_dram_bytes=4.8e12 * 1e-3)  # atomics: read + write
    assert abs(k.ms(cm.GPUS["h200"]) - 3.0) < 1e-9
    assert abs(cm.Kernel("z", atomic_dram_bytes=4.8e12 * 2e-3).ms(cm.GPUS["h200"]) - 4.0) < 1e-9


def test_bench_model_only_prints_the_table():
    proc = subprocess.run([sys.executable, str(BENCH / "bench_linear_ce.py"), "--model-only"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ours_ce_irm" in proc.stdout and "shape e2e_8b" in proc.stdout


def test_penalty_strategy_follows_the_op_rule():
    from unlearn_fast.ops._chunked_linear_ce import penalty_recompute_is_cheaper

    cm = _model()
    # 16k tokens in 4 environments: per-environment buffers (3 matmuls) win; 2k tokens: the 4th matmul is cheaper
    assert not penalty_recompute_is_cheaper(16384, 4) and penalty_recompute_is_cheaper(2048, 4)
    result = cm.model()["variants"]
    assert result["ours_penalty"]["flops"] < result["ours_ce_irm"]["flops"]
    assert result["ours_penalty"]["e2e_8b"]["flops"] == result["ours_ce_irm"]["e2e_8b"]["flops"]
    # the rule picks the cheaper strategy of the model at both shapes
    gpu = cm.GPUS["h200"]
    for n, recompute in ((16384, False), (2048, True)):
        t_buffers = sum(k.ms(gpu) for k in cm.penalty_with_buffers(n, 4096, 128256, 4).kernels)
        t_recompute = sum(k.ms(gpu) for k in cm.chunked_ce_irm(n, 4096, 128256, 4).kernels)
        assert (t_recompute < t_buffers) == recompute, (n, t_buffers, t_recompute)


def test_objective_is_three_matmuls_in_chunks_of_whole_environments():
    """irm_objective (the CE+IRM loss as one scalar) forms its gradient in the forward: 6·N·H·V matmul FLOPs, not the
    tuple op's 8, and within 1.2x the floor; the 2k-token step holds all four environments in one chunk."""
    cm = _model()
    result = cm.model()["variants"]
    n, h, v = 16384, 4096, 128256
    row = result["ours_objective"]
    matmul_flops = sum(k["flops"] for k in row["kernels"] if not k["name"].startswith("row kernel"))
    assert matmul_flops == 6 * n * h * v
    assert row["over_floor_h200"] <= 1.2 and row["over_floor_h100"] <= 1.2
    assert row["predicted_ms_h200"] < result["ours_ce_irm"]["predicted_ms_h200"]
    logits = [k for k in row["kernels"] if k["name"].startswith("logits")]
    assert logits[0]["count"] == 4 and logits[0]["grid"] == (4096, v)  # one environment per 1 GiB block
    e2e = cm.objective(2048, h, v, 4)
    assert [k.count for k in e2e.kernels if k.name.startswith("logits")] == [1]
    # an environment larger than a block: statistics, then recompute (8·N·H·V; the model counts whole chunks)
    big = cm.objective(4 * 8192, h, v, 4)
    flops = sum(k.flops for k in big.kernels if not k.name.startswith("row kernel"))
    assert 8 * 4 * 8192 * h * v <= flops < 8.3 * 4 * 8192 * h * v
