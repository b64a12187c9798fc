"""Cost model, on paper, of the linear cross-entropy variants on an H100 / H200 (no GPU needed).

Every variant is the list of kernels it launches, each with its FLOPs, HBM bytes, fp32 atomic
bytes and grid, counted from the code (kernels/linear_ce.py, kernels/linear_ce_rows.py,
unlearn_fast/ops/_chunked_linear_ce.py). A kernel's time is a roofline:

    t = max(flops / matmul_rate, (hbm_bytes + 2 · atomic_dram_bytes) / hbm_bandwidth)

with the measured bf16 GEMM rate (788 TFLOP/s on the lent H200; H100 SXM has the same SMs and
clocks) and the HBM bandwidth (3.35 TB/s H100, 4.8 TB/s H200) as parameters. Atomic adds into
d input miss L2 (every vocabulary tile adds into every token row: [N, H] fp32 is 268 MB at the
GPU shape, L2 is 50 MB), so each costs a DRAM read and write; the d weight atomics are assumed to
hit L2 and are not charged — the fused backward's time is a LOWER bound. Kernels run one after
another (no overlap between launches): a variant's time is the sum over its kernels.
The floor is the three cuBLAS-sized matmuls any fwd+bwd needs (logits, d input, d weight):
6·N·H·V FLOPs at the same GEMM rate.

    python bench/cost_model.py            # the table at the GPU shapes
    python bench/cost_model.py bench/results/cost_model-<date>.json   # and the results file
    python bench/bench_linear_ce.py --model-only
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

GPUS = {
    # bf16 dense peak, measured bf16 GEMM rate, HBM bandwidth, SMs
    "h100": dict(peak_tflops=990.0, matmul_tflops=788.0, hbm_tbps=3.35, sms=132),
    "h200": dict(peak_tflops=990.0, matmul_tflops=788.0, hbm_tbps=4.8, sms=132),
}
SHAPES = {
    "bench": dict(N=16384, H=4096, V=128256, E=4),  # bench_linear_ce.py on a GPU
    "e2e_8b": dict(N=2048, H=4096, V=128256, E=4),  # bench/e2e.py --model-size 8b: one step's tokens
}
BF16, FP32 = 2, 4
CHUNK_WORKSPACE = 1 << 29  # ops/_chunked_linear_ce._WORKSPACE_ELEMS (read from there when importable)
FUSED = dict(BLOCK_N=64, BLOCK_V=128)  # kernels/linear_ce.config(bf16) on CUDA, forward and backward


@dataclass
class Kernel:
    name: str
    flops: float = 0.0
    hbm_bytes: float = 0.0
    atomic_bytes: float = 0.0  # fp32 values added atomically
    atomic_dram_bytes: float = 0.0  # of which miss L2 (each costs a DRAM read + write)
    grid: tuple = ()
    count: int = 1  # launches of this kernel (chunks)

    def ms(self, gpu: dict) -> float:
        compute = self.flops / (gpu["matmul_tflops"] * 1e12)
        memory = (self.hbm_bytes + 2 * self.atomic_dram_bytes) / (gpu["hbm_tbps"] * 1e12)
        return 1e3 * max(compute, memory)


@dataclass
class Variant:
    name: str
    description: str
    kernels: list = field(default_factory=list)

    def add(self, k: Kernel, times: int = 1):
        if times:
            k.flops *= times
            k.hbm_bytes *= times
            k.atomic_bytes *= times
            k.atomic_dram_bytes *= times
            k.count = times
            self.kernels.append(k)


def _workspace():
    try:
        from unlearn_fast.ops._chunked_linear_ce import _WORKSPACE_ELEMS

        return _WORKSPACE_ELEMS
    except ImportError:  # the model runs without the package too
        return CHUNK_WORKSPACE


def _chunks(n, v):
    """(rows, count) of the chunks of n rows: as many as the code takes (workspace // V rows each), counted as
    equal chunks so that their sum is n rows (the code's last chunk is the partial one: the same FLOPs)."""
    count = math.ceil(n / max(1, min(n, _workspace() // v)))
    return math.ceil(n / count), count


# -- building blocks of the chunked path (per chunk of c rows) ------------------------------------

def _logits_mm(c, h, v):
    return Kernel("logits mm (cuBLAS, bf16 out)", 2 * c * h * v, BF16 * (c * h + v * h + c * v), grid=(c, v))


def _dh_mm(c, h, v):
    return Kernel("d input = dz W (cuBLAS, fp32 out)", 2 * c * h * v, BF16 * (c * v + v * h) + FP32 * c * h,
                  grid=(c, h))


def _dw_mm(c, h, v, first=False):
    # fp32 C read and written (beta = 1); the first chunk only writes it (beta = 0, no zero fill)
    return Kernel("d weight = dzᵀ h (first chunk)" if first else "d weight += dzᵀ h (cuBLAS, fp32 accumulate)",
                  2 * c * h * v, BF16 * (c * v + c * h) + (1 if first else 2) * FP32 * v * h, grid=(v, h))


def _dw_mms(var, c, h, v, chunks, times=1):
    var.add(_dw_mm(c, h, v, first=True), times)
    var.add(_dw_mm(c, h, v), times * (chunks - 1))


def _rows(c, v, reads, writes, what):
    return Kernel(f"row kernel ({what})", 12 * c * v, BF16 * c * v * (reads + writes), grid=(c,))


def _elementwise(name, bytes_):
    return Kernel(name, 0, bytes_)


def _hand_over(n, h, v):
    """The backward of a gradient formed in the forward: scale the kept fp32 grads in place, cast to bf16."""
    return _elementwise("backward: kept fp32 grads scaled into bf16 (one pass)", (FP32 + BF16) * (v * h + n * h))


def chunked_ce(n, h, v, e) -> Variant:
    """uf.ops.linear_cross_entropy (mean) on CUDA: gradient formed in the forward (_SummedCE)."""
    c, chunks = _chunks(n, v)
    var = Variant("ours_ce", f"chunked, gradient in the forward: {chunks} chunk(s) of {c} rows")
    var.add(_logits_mm(c, h, v), chunks)
    var.add(_rows(c, v, 2, 1, "statistics + dz in one launch"), chunks)
    var.add(_dh_mm(c, h, v), chunks)
    _dw_mms(var, c, h, v, chunks)
    var.add(_hand_over(n, h, v))
    return var


def chunked_ce_irm(n, h, v, e) -> Variant:
    """uf.ops.linear_cross_entropy_irm on CUDA: the upstream (per-environment) is known only in backward."""
    c, chunks = _chunks(n, v)
    if chunks == 1:  # the forward's logits block is kept for the backward: no recompute
        var = Variant("ours_ce_irm", f"one chunk of {c} rows: statistics forward, logits kept for the backward")
    else:
        var = Variant("ours_ce_irm", f"chunked, statistics forward + recompute backward: {chunks} chunks of {c} rows")
    var.add(_logits_mm(c, h, v), chunks)
    var.add(_rows(c, v, 1, 0, "forward statistics lse, z_y, E_p[z]"), chunks)
    if chunks > 1:
        var.add(_logits_mm(c, h, v), chunks)
    var.add(_rows(c, v, 1, 1, "backward dz, lse known"), chunks)
    var.add(_dh_mm(c, h, v), chunks)
    _dw_mms(var, c, h, v, chunks)
    var.add(_elementwise("cast grads to bf16", (FP32 + BF16) * (v * h + n * h)))
    return var


def _env_rows_fit(rows, v) -> bool:
    """Whether an environment of ``rows`` tokens goes in one chunk (ops/_chunked_linear_ce.env_chunk_rows)."""
    return rows <= _workspace() // v


def objective(n, h, v, e) -> Variant:
    """uf.ops.irm_objective on CUDA (Σ w_e CE_e + λ P as one scalar), like its code: chunks of whole environments
    (as many as one logits block holds), each chunk's statistics, its environments' s_e, then dz with the same
    logits (3 matmuls); an environment larger than a chunk: statistics, then a recomputing pass (4)."""
    per_env = math.ceil(n / e)
    if not _env_rows_fit(per_env, v):
        c, chunks = _chunks(per_env, v)
        var = Variant("ours_objective", f"per environment ({e} x {per_env} tokens) over {chunks} chunks: "
                                        "statistics, then a recomputing gradient pass")
        var.add(_logits_mm(c, h, v), 2 * e * chunks)
        var.add(_rows(c, v, 1, 0, "statistics"), e * chunks)
        var.add(_rows(c, v, 1, 1, "dz, lse known"), e * chunks)
        var.add(_dh_mm(c, h, v), e * chunks)
        _dw_mms(var, c, h, v, e * chunks)
        var.add(_hand_over(n, h, v))
        return var
    envs_per_chunk = min(e, max(1, (_workspace() // v) // per_env))
    chunks = math.ceil(e / envs_per_chunk)
    c = per_env * envs_per_chunk
    var = Variant("ours_objective", f"{chunks} chunk(s) of {envs_per_chunk} whole environment(s) "
                                    f"({e} x {per_env} tokens), gradient in the forward")
    var.add(_logits_mm(c, h, v), chunks)
    var.add(_rows(c, v, 1, 0, "statistics lse, z_y, E_p[z]"), chunks)
    var.add(_rows(c, v, 1, 1, "dz from the environments' s_e"), chunks)
    var.add(_dh_mm(c, h, v), chunks)
    _dw_mms(var, c, h, v, chunks)
    var.add(_hand_over(n, h, v))
    return var


def _penalty_recomputes(n, e) -> bool:
    try:
        from unlearn_fast.ops._chunked_linear_ce import penalty_recompute_is_cheaper
    except ImportError:  # the model runs without the package too: the same rule
        return 2 * n < 200 * (16 * e - 4)
    return penalty_recompute_is_cheaper(n, e)


def chunked_penalty(n, h, v, e) -> Variant:
    """uf.ops.irm_penalty on CUDA (what ILU trains), the op's strategies in its order: every environment in one chunk
    (irm_objective's pass with w = 0); else per-group buffers, or with few tokens a recompute (as
    linear_cross_entropy_irm)."""
    if _env_rows_fit(math.ceil(n / e), v):
        var = objective(n, h, v, e)
        var.name = "ours_penalty"
        return var
    if _penalty_recomputes(n, e):
        var = chunked_ce_irm(n, h, v, e)
        var.name = "ours_penalty"
        var.description = "few tokens for per-environment buffers: recompute in backward; " + var.description
        return var
    return penalty_with_buffers(n, h, v, e)


def penalty_with_buffers(n, h, v, e) -> Variant:
    """irm_penalty's gradient-in-forward strategy: one [V, H] fp32 buffer per environment."""
    per_env = math.ceil(n / e)
    c, chunks = _chunks(per_env, v)
    var = Variant("ours_penalty", f"chunked, per environment ({e} x {per_env} tokens), gradient in the forward: "
                                  f"{chunks} chunk(s) of {c} rows each")
    var.add(_logits_mm(c, h, v), e * chunks)
    var.add(_rows(c, v, 1, 0, "statistics"), e * chunks)
    var.add(_rows(c, v, 1, 1, "dz from the chunk's statistics"), e * chunks)
    var.add(_dh_mm(c, h, v), e * chunks)
    _dw_mms(var, c, h, v, chunks, times=e)
    var.add(_elementwise("first environment: scale by 2 s_e (the total)", FP32 * 2 * v * h))
    var.add(_elementwise("total += 2 s_e · group buffer (addcmul, per environment)", FP32 * 3 * v * h), e - 1)
    var.add(_hand_over(n, h, v))
    return var


def fused(n, h, v, e, irm: bool) -> Variant:
    """backend="triton": logits tiles in registers; the backward adds fp32 tiles atomically."""
    bn, bv = FUSED["BLOCK_N"], FUSED["BLOCK_V"]
    gn, gv = math.ceil(n / bn), math.ceil(v / bv)
    waves = math.ceil(gn / GPUS["h200"]["sms"])  # programs in flight walk W together: one L2 pass per wave
    var = Variant("fused_ce_irm" if irm else "fused_ce",
                  f"backend='triton' (fused, atomics), grid fwd {gn}, bwd {gn} x {gv}")
    var.add(Kernel("fused forward (online softmax)", 2 * n * h * v, BF16 * (waves * v * h + n * h), grid=(gn,)))
    var.add(_elementwise("d input, d weight zero fill", FP32 * (n * h + v * h)))
    dh_atomic = FP32 * gv * n * h  # every vocab tile adds into every token row
    dw_atomic = FP32 * gn * v * h  # every token tile adds into every vocab row
    var.add(Kernel("fused backward (recompute, 2 dots, atomics)", 6 * n * h * v,
                   # W from DRAM once (a vocabulary tile's 256 programs run back to back); h (134 MB at the
                   # bench shape, > 50 MB L2) once per vocabulary tile
                   BF16 * (v * h + gv * n * h),
                   atomic_bytes=dh_atomic + dw_atomic, atomic_dram_bytes=dh_atomic, grid=(gn, gv)))
    var.add(_elementwise("cast grads to bf16", (FP32 + BF16) * (v * h + n * h)))
    return var


def liger(n, h, v, e) -> Variant:
    """Liger-Kernel's fused linear CE as its code chunks it (peer; CE only, no IRM): chunk = N / 2^ceil(log2(V/H)),
    d weight accumulated by addmm in the weight dtype (bf16)."""
    inc = 2 ** math.ceil(math.log2(max(1, math.ceil(v / h))))
    c = 2 ** math.ceil(math.log2(max(1, math.ceil(n / inc))))
    chunks = math.ceil(n / c)
    var = Variant("liger_flce", f"peer, CE only: {chunks} chunks of {c} rows, bf16 d weight accumulation")
    var.add(_logits_mm(c, h, v), chunks)
    var.add(_rows(c, v, 2, 1, "CE + gradient in place"), chunks)
    var.add(Kernel("d input mm", 2 * c * h * v, BF16 * (c * v + v * h + c * h)), chunks)
    var.add(Kernel("d weight addmm (bf16 C)", 2 * c * h * v, BF16 * (c * v + c * h + 2 * v * h)), chunks)
    return var


VARIANTS = {
    "ours_ce": chunked_ce,
    "ours_ce_irm": chunked_ce_irm,
    "ours_penalty": chunked_penalty,
    "ours_objective": objective,
    "fused_ce": lambda n, h, v, e: fused(n, h, v, e, irm=False),
    "fused_ce_irm": lambda n, h, v, e: fused(n, h, v, e, irm=True),
    "liger_flce": liger,
}


def floor_ms(n, h, v, gpu) -> float:
    return 1e3 * 6 * n * h * v / (gpu["matmul_tflops"] * 1e12)


def evaluate(shape: dict, gpus=GPUS) -> dict:
    n, h, v, e = shape["N"], shape["H"], shape["V"], shape["E"]
    out = {}
    for name, build in VARIANTS.items():
        var = build(n, h, v, e)
        row = dict(
            description=var.description,
            flops=sum(k.flops for k in var.kernels),
            hbm_bytes=sum(k.hbm_bytes for k in var.kernels),
            atomic_bytes=sum(k.atomic_bytes for k in var.kernels),
        )
        for g, spec in gpus.items():
            row[f"predicted_ms_{g}"] = round(sum(k.ms(spec) for k in var.kernels), 2)
            row[f"floor_ms_{g}"] = round(floor_ms(n, h, v, spec), 2)
            row[f"over_floor_{g}"] = round(row[f"predicted_ms_{g}"] / row[f"floor_ms_{g}"], 3)
        row["kernels"] = [dict(asdict(k), **{f"ms_{g}": round(k.ms(s), 3) for g, s in gpus.items()})
                          for k in var.kernels]
        out[name] = row
    return out


def model(gpus=GPUS) -> dict:
    """cost_model -> variant -> {flops, hbm_bytes, atomic_bytes, predicted_ms_*, floor_ms_*, ...} at the bench GPU
    shape, with the same fields at the e2e 8B shape under "e2e_8b"."""
    main = evaluate(SHAPES["bench"], gpus)
    e2e = evaluate(SHAPES["e2e_8b"], gpus)
    for name in main:
        main[name]["e2e_8b"] = e2e[name]
    return dict(parameters=dict(gpus=gpus, shapes=SHAPES, dtype="bfloat16",
                                rule="t = max(flops/matmul_rate, (hbm + 2 atomic_dram)/bw), kernels in sequence"),
                variants=main)


def table(result: dict) -> str:
    lines = []
    for shape_name, pick in (("bench", lambda r: r), ("e2e_8b", lambda r: r["e2e_8b"])):
        s = result["parameters"]["shapes"][shape_name]
        lines.append(f"shape {shape_name}: N={s['N']} H={s['H']} V={s['V']} E={s['E']} bf16 (fwd+bwd)")
        lines.append(f"  {'variant':14} {'TFLOP':>7} {'HBM GB':>8} {'atomic GB':>9} {'H100 ms':>8} {'H200 ms':>8} "
                     f"{'floor ms':>8} {'x floor H200':>12}")
        for name, r in result["variants"].items():
            r = pick(r)
            lines.append(f"  {name:14} {r['flops'] / 1e12:7.1f} {r['hbm_bytes'] / 1e9:8.1f} "
                         f"{r['atomic_bytes'] / 1e9:9.1f} "
                         f"{r['predicted_ms_h100']:8.1f} {r['predicted_ms_h200']:8.1f} {r['floor_ms_h200']:8.1f} "
                         f"{r['over_floor_h200']:12.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    result = model()
    print(table(result))
    if len(sys.argv) > 1:  # a results file: predicted on paper, not measured
        with open(sys.argv[1], "w") as f:
            json.dump(dict(benchmark="cost_model", command=f"python bench/cost_model.py {sys.argv[1]}",
                           note="predicted by the roofline model of bench/cost_model.py, not measured",
                           parameters=result["parameters"], cost_model=result["variants"]), f, indent=1)
            f.write("\n")
