"""CI sanity run of the op benchmarks (not a timing): tiny shapes, and the JSON must carry the strong
baseline rows, the ratios against them and the machine fields a reader needs to judge the figures."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
MACHINE_FIELDS = ("device", "cpu_model", "cpu_vector_extensions", "cpu_count", "torch_cpu_capability", "mkl",
                  "threads", "versions", "date")


def _script(name):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return __import__(name)


def _check_machine(run):
    env = run["environment"]
    for key in MACHINE_FIELDS:
        assert key in env, key
    assert env["cpu_model"] and isinstance(env["cpu_vector_extensions"], list)
    assert len(run["loadavg_at_write"]) == 3
    for variant, loads in run["loadavg"].items():
        assert loads and all(len(x["before"]) == 3 and len(x["after"]) == 3 for x in loads), variant


def _positive(fig, *keys):
    for key in keys:
        assert isinstance(fig[key], (int, float)) and math.isfinite(fig[key]) and fig[key] > 0, (key, fig)


def test_bench_sam_has_the_strong_foreach_baseline(tmp_path):
    bench_sam = _script("bench_sam")
    out = tmp_path / "sam.json"
    bench_sam.main(["--tiny", "--repeat", "1", "--rounds", "1", "--variants",
                    "naive_loop,foreach_strong,foreach_swap,torch_out_swap,cpp_copy,cpp", "--json", str(out)])
    run = json.loads(out.read_text())
    _check_machine(run)
    assert run["baseline"] == "foreach_strong"
    strong, ours = run["variants"]["foreach_strong"], run["variants"]["cpp"]
    assert not [v for v, fig in run["variants"].items() if "error" in fig], run["variants"]
    assert ours["exchanged_tensors"] == ours["tensors"], "every tensor of the list owns its storage: all traded"
    for key in ("foreach_swap_over_ours_sam_time", "torch_out_swap_over_ours_sam_time",
                "copy_restore_over_ours_sam_time"):
        assert key in run["ratios"], key
    _positive(strong, "sam_s", "sam_step_s", "sam_step_foreach_adamw_s", "copy_gb_per_s", "peak_extra_mb")
    _positive(ours, "sam_s", "sam_step_s", "copy_gb_per_s")
    assert ours["cpu_kernels"] in ("avx512", "avx2", "default") and ours["auto_backend"] in ("cpp", "torch")
    for key in ("strong_over_ours_sam_time", "strong_over_ours_step_time", "strong_best_adamw_over_ours_step_time",
                "ours_fraction_of_copy_bw"):
        assert key in run["ratios"], key
    assert any(k.startswith("strong_over_ours_sam_time") for k in run["targets"])
    # the ratio is the two rows' figures divided, not a figure of its own
    assert run["ratios"]["strong_over_ours_sam_time"] == strong["sam_s"] / ours["sam_s"]


def test_bench_linear_ce_sweeps_torch_chunks_and_names_the_best(tmp_path):
    bench = _script("bench_linear_ce")
    out = tmp_path / "lce.json"
    bench.main(["--tiny", "--repeat", "1", "--chunks", "16,auto",
                "--variants", "torch_chunked_bs16,torch_chunked_auto,ours_ce,ours_ce_irm", "--json", str(out)])
    run = json.loads(out.read_text())
    _check_machine(run)
    variants = run["variants"]
    for name in ("torch_chunked_bs16", "torch_chunked_auto", "ours_ce", "ours_ce_irm"):
        assert "error" not in variants[name], variants[name]
        _positive(variants[name], "median_s")
    best = run["baseline"]["variant"]
    assert best in ("torch_chunked_bs16", "torch_chunked_auto")
    assert variants[best]["median_s"] == min(variants[k]["median_s"] for k in ("torch_chunked_bs16", "torch_chunked_auto"))
    assert run["ratios"]["ours_ce_over_torch_time"] == variants["ours_ce"]["median_s"] / variants[best]["median_s"]
    assert "ours_irm_over_torch_time <= 1.3" in run["targets"]
