"""The compile gate (kernels/compile_check.py) and the bugs it checks, on real compiles for named CUDA targets.

No GPU is needed: triton.compile builds for a GPUTarget. The builds must see real (not
interpreted) kernels, so they run in a subprocess without TRITON_INTERPRET (conftest sets it
for this process). One subprocess compiles everything the tests below look at.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

_SCRIPT = r"""
import json, sys
from unlearn_fast.kernels import compile_check as cc
cc._init_worker(sys.argv[1])
import torch
from unlearn_fast.kernels import linear_ce
rows = {}
flat = [b for b in cc.all_builds("multi_tensor") if b.variant in ("fp32", "fp32 weighted=1", "fp32 adaptive=0",
                                                                  "acc=fp32 grad=fp32 base=1")]
for b in flat:
    rows[b.kernel] = cc.compile_build(b, "sm_90", keep_ir=True)
bwd = [b for b in cc.all_builds("_linear_ce_bwd_kernel")]
pick = lambda dt: next(b for b in bwd if b.variant == f"{dt} bias=1 irm=1")
rows["bwd bf16"] = cc.compile_build(pick("bf16"), "sm_90", keep_ir=True)
rows["bwd fp32 sm_89"] = cc.compile_build(pick("fp32"), "sm_89")
old = pick("fp32")  # the configuration the fp32 backward had before (64 x 128 x 64): over sm_89's limit
old.constexprs.update(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64)
old.num_warps = 8
rows["bwd fp32 old config sm_89"] = cc.compile_build(old, "sm_89")
print("ROWS" + json.dumps(rows))
"""


def _clean_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    cache = tmp_path_factory.mktemp("triton-cache")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(cache)], capture_output=True, text=True,
                          env=_clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("ROWS", 1)[1])


def _addptr_offsets(ttir: str) -> list[str]:
    """Element types of the offsets of every tt.addptr in a TTIR module ("i32", "i64")."""
    return re.findall(r"tt\.addptr .*:[^,]*,\s*(?:tensor<[\dx]*x)?(i\d+)>?", ttir)


@pytest.mark.parametrize("kernel", ["multi_tensor._squared_norm_kernel", "multi_tensor._perturb_kernel",
                                    "multi_tensor._copy_kernel", "multi_tensor._fd_hvp_kernel"])
def test_flat_buffer_kernels_use_int64_offsets(compiled, kernel):
    # An 8B model's flat buffer has more than 2**31 elements: int32 offsets would wrap around.
    row = compiled[kernel]
    assert row["ok"], row
    kinds = _addptr_offsets(row["ttir"])
    assert kinds, "no tt.addptr found: the pattern no longer matches the TTIR"
    assert set(kinds) == {"i64"}, f"{kernel}: pointer offsets {kinds}"


def test_fused_backward_atomics_are_relaxed(compiled):
    ttir = compiled["bwd bf16"]["ttir"]
    atomics = re.findall(r"tt\.atomic_rmw fadd, (\w+)", ttir)
    assert len(atomics) == 3, atomics  # d bias, d input, d weight
    assert set(atomics) == {"relaxed"}, atomics


def test_fp32_backward_fits_sm89_shared_memory(compiled):
    row = compiled["bwd fp32 sm_89"]
    assert row["ok"], row
    assert row["shared_bytes"] <= 101376
    # the gate catches a configuration over the limit (the one the kernel had before)
    old = compiled["bwd fp32 old config sm_89"]
    assert old["shared_bytes"] > 101376 and not old["ok"] and "shared memory" in old["error"]


def test_bf16_backward_has_no_spills_on_sm90(compiled):
    row = compiled["bwd bf16"]
    assert row["ok"] and row["spills"] == 0 and row["registers"] > 0


def test_parse_ptxas_takes_the_worst_function():
    from unlearn_fast.kernels.compile_check import parse_ptxas

    log = """ptxas info    : Compiling entry function 'a' for 'sm_90'
ptxas info    : Function properties for a
    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers
ptxas info    : Function properties for b
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers"""
    assert parse_ptxas(log) == (168, 12)
    assert parse_ptxas("") == (None, None)


def test_gate_command_writes_rows_and_exit_code(tmp_path):
    out = tmp_path / "gate.json"
    proc = subprocess.run([sys.executable, "-m", "unlearn_fast.kernels.compile_check", "--only", "_copy_kernel",
                           "--archs", "sm_89", "--no-nvcc", "--workers", "1", "--json", str(out)],
                          capture_output=True, text=True, env=_clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["builds"] == 3 and result["failed"] == 0  # 3 dtypes x 1 target
    for row in result["rows"]:
        assert {"kernel", "variant", "arch", "ok", "registers", "spills", "shared_bytes"} <= set(row)
        assert row["ok"] and row["registers"] > 0 and row["spills"] == 0
    assert "compile gate: 3 builds, 0 failed" in proc.stdout


def test_nvcc_absent_is_a_skip_not_a_failure(monkeypatch, capsys):
    from unlearn_fast.kernels import compile_check as cc

    monkeypatch.setattr(cc.shutil, "which", lambda name: None)
    rows = cc.run_nvcc()
    assert [r["arch"] for r in rows] == ["sm_80", "sm_90"]
    assert all(r["ok"] is None and "nvcc not found" in r["error"] for r in rows)
    assert "SKIPPED" in capsys.readouterr().err


def test_every_launch_configuration_is_built():
    # The gate builds what the helpers choose on CUDA, not a copy of it.
    import torch

    from unlearn_fast.kernels import compile_check as cc
    from unlearn_fast.kernels import linear_ce, linear_ce_rows

    builds = cc.all_builds()
    fwd = [b for b in builds if b.kernel.endswith("_fwd_kernel")]
    assert len(fwd) == 6 and len([b for b in builds if b.kernel.endswith("_bwd_kernel")]) == 12
    for b in fwd:
        dtype = torch.float32 if b.variant.startswith("fp32") else torch.bfloat16
        want = dict(linear_ce.config(dtype, interpret=False))
        want.pop("num_warps")
        assert {k: b.constexprs[k] for k in want} == want
    for b in (b for b in builds if b.kernel.endswith("_bwd_kernel")):
        dtype = torch.float32 if b.variant.startswith("fp32") else torch.bfloat16
        want = dict(linear_ce.config(dtype, interpret=False, backward=True))
        assert b.num_warps == want.pop("num_warps")
        assert {k: b.constexprs[k] for k in want} == want
    rows = [b for b in builds if b.kernel.endswith("_rows_kernel")]
    assert {b.constexprs["BLOCK_V"] for b in rows} == {linear_ce_rows.config(torch.float32, False)["BLOCK_V"],
                                                      linear_ce_rows.config(torch.bfloat16, False)["BLOCK_V"]}
