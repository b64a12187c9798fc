"""Multi-tensor SAM ops against the naive per-parameter loop (unlearn_fast/testing/reference_sam.py), every backend."""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch

import unlearn_fast as uf
from tests.conftest import HAS_TRITON
from unlearn_fast.testing.reference_sam import max_ulps, naive_global_norm, naive_perturbed

SHAPES = [(7, 5), (13,), (3, 4, 5), (1,), (64, 33), (2, 1, 9)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(dtype, shapes=SHAPES, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    grads = [(scale * torch.randn(s, generator=g)).to(dtype) for s in shapes]
    return params, grads


def bits(t):
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, torch.int16))


@pytest.fixture(scope="session")
def cpp_ops():
    """The compiled extension, built once per test session (a build failure fails the cpp tests)."""
    from unlearn_fast.ops import _cpp

    if _cpp.disabled():
        pytest.skip("UNLEARN_FAST_NO_CPP=1")
    return _cpp.load()


@pytest.fixture(params=["torch", "cpp", "triton"])
def mt_backend(request):
    if request.param == "cpp":
        request.getfixturevalue("cpp_ops")
    if request.param == "triton" and not (HAS_TRITON and (torch.cuda.is_available() or
                                                          os.environ.get("TRITON_INTERPRET") == "1")):
        pytest.skip("needs triton on a GPU or under TRITON_INTERPRET=1")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_global_norm_matches_fp64(dtype, adaptive, mt_backend):
    params, grads = make(dtype)
    got = uf.ops.global_grad_norm(grads, adaptive_params=params if adaptive else None, backend=mt_backend)
    want = naive_global_norm(grads, params if adaptive else None)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert abs(float(got) - want) <= 4 * torch.finfo(torch.float32).eps * want


def test_global_norm_skips_none_and_empty(mt_backend):
    params, grads = make(torch.float32)
    with_none = [grads[0], None, grads[2]]
    assert float(uf.ops.global_grad_norm(with_none, backend=mt_backend)) == pytest.approx(
        naive_global_norm([grads[0], grads[2]]), rel=1e-6)
    assert float(uf.ops.global_grad_norm([None, None], backend=mt_backend)) == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturb_within_one_ulp_and_restore_bit_exact(dtype, adaptive, mt_backend):
    params, grads = make(dtype, seed=1)
    before = [p.detach().clone() for p in params]
    grads_before = [g.clone() for g in grads]
    rho = 0.5 if adaptive else 0.05  # large enough that the step shows in bf16
    state = uf.ops.sam_perturb_(params, grads, rho, adaptive=adaptive, backend=mt_backend)
    want = naive_perturbed(before, grads, rho, adaptive, scale=float(state.scale))
    exact_scale = rho / naive_global_norm(grads, before if adaptive else None)
    assert abs(float(state.scale) - exact_scale) <= 4 * torch.finfo(torch.float32).eps * exact_scale
    moved = sum(not torch.equal(p, b) for p, b in zip(params, before))
    assert moved >= len(params) - 1, "the perturbation must move the weights"
    for p, w, b in zip(params, want, before):
        assert p.dtype == dtype
        assert max_ulps(p.detach(), w, b) <= 1.0
    assert float(state.norm) == pytest.approx(naive_global_norm(grads, before if adaptive else None),
                                              rel=1e-6)
    for g, g0 in zip(grads, grads_before):
        assert torch.equal(g, g0), "the caller's gradients must not change"
    uf.ops.sam_restore_(state)
    for p, b in zip(params, before):
        assert torch.equal(bits(p.detach()), bits(b))
    with pytest.raises(RuntimeError, match="already restored"):
        uf.ops.sam_restore_(state)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_gradient_gives_no_move_and_no_nan(dtype, mt_backend):
    params, _ = make(dtype)
    before = [p.detach().clone() for p in params]
    zeros = [torch.zeros_like(p) for p in params]
    for adaptive in (False, True):
        state = uf.ops.sam_perturb_(params, zeros, 0.05, adaptive=adaptive, backend=mt_backend)
        assert float(state.norm) == 0.0 and not math.isnan(float(state.scale))
        for p, b in zip(params, before):
            assert torch.equal(p.detach(), b)
        uf.ops.sam_restore_(state)


def test_none_grads_are_skipped(mt_backend):
    params, grads = make(torch.float32, seed=2)
    before = [p.detach().clone() for p in params]
    grads[1] = None
    grads[4] = None
    state = uf.ops.sam_perturb_(params, grads, 0.1, backend=mt_backend)
    want = naive_perturbed(before, grads, 0.1, scale=float(state.scale))
    assert torch.equal(params[1].detach(), before[1]) and torch.equal(params[4].detach(), before[4])
    for p, w, b in zip(params, want, before):
        assert max_ulps(p.detach(), w, b) <= 1.0
    uf.ops.sam_restore_(state)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_bad_input_names_the_argument(mt_backend):
    params, grads = make(torch.float32)
    with pytest.raises(ValueError, match="same length"):
        uf.ops.sam_perturb_(params, grads[:-1], 0.1, backend=mt_backend)
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        uf.ops.sam_perturb_(params, [grads[0], grads[0]] + grads[2:], 0.1, backend=mt_backend)
    with pytest.raises(ValueError, match="rho"):
        uf.ops.sam_perturb_(params, grads, -0.1, backend=mt_backend)
    with pytest.raises(ValueError, match=r"params\[0\]"):
        uf.ops.sam_perturb_(params, [grads[0].to("meta")] + grads[1:], 0.1, backend=mt_backend)
    with pytest.raises(TypeError, match=r"grads\[0\]"):
        uf.ops.sam_perturb_(params, [grads[0].long()] + grads[1:], 0.1, backend=mt_backend)
    with pytest.raises(TypeError, match=r"params\[2\]"):
        uf.ops.sam_perturb_(params[:2] + [torch.zeros(3, 4, 5, dtype=torch.int32)] + params[3:], grads, 0.1,
                            backend=mt_backend)
    with pytest.raises(TypeError, match="tensors"):
        uf.ops.global_grad_norm([torch.ones(3, dtype=torch.int64)], backend=mt_backend)
    with pytest.raises(ValueError, match="adaptive_params"):
        uf.ops.global_grad_norm(grads, adaptive_params=params[:-1], backend=mt_backend)
    with pytest.raises(TypeError, match="state"):
        uf.ops.sam_restore_("not a state")
    with pytest.raises(ValueError, match="backend"):
        uf.ops.global_grad_norm(grads, backend="cuda-magic")


def _gloo_worker(rank, world, init_file, results_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(100 + rank)  # each rank holds different gradients
        grads = [torch.randn(s, generator=g) for s in SHAPES]
        params = [torch.randn(s, generator=g) for s in SHAPES]
        norm = uf.ops.global_grad_norm(grads)
        state = uf.ops.sam_perturb_(params, grads, 0.1)
        with uf.ops.replicated_gradients():  # each process holds the whole gradient: no reduction
            local_norm = uf.ops.global_grad_norm(grads)
        torch.save({"grads": grads, "norm": norm, "sam_norm": state.norm, "local_norm": local_norm},
                   os.path.join(results_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_norm_is_the_global_one():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        # fork: the children reuse the imported torch (spawn re-imports it, ~10 s per process here)
        method = "fork" if not torch.cuda.is_available() else "spawn"
        mp.start_processes(_gloo_worker, args=(2, os.path.join(tmp, "store"), tmp), nprocs=2, join=True,
                           start_method=method)
        out = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    everything = out[0]["grads"] + out[1]["grads"]
    want = naive_global_norm(everything)
    local = naive_global_norm(out[0]["grads"])
    assert abs(want - local) > 1e-3 * want  # the test can tell the global norm from a local one
    for o in out:
        assert float(o["norm"]) == pytest.approx(want, rel=1e-6)
        assert float(o["sam_norm"]) == pytest.approx(want, rel=1e-6)
        assert float(o["local_norm"]) == pytest.approx(naive_global_norm(o["grads"]), rel=1e-6)


def test_cpp_per_tensor_norms_and_asam_weighting(cpp_ops):
    params, grads = make(torch.bfloat16, seed=3)
    total, per = cpp_ops.squared_norm(grads, [], True)
    assert per.shape == (len(grads),)
    for g, n2 in zip(grads, per):
        assert float(n2) == pytest.approx(float((g.double() ** 2).sum()), rel=1e-6)
    assert float(total) == pytest.approx(naive_global_norm(grads) ** 2, rel=1e-6)
    total_w, _ = cpp_ops.squared_norm(grads, [p.detach() for p in params], False)
    assert float(total_w) == pytest.approx(naive_global_norm(grads, params) ** 2, rel=1e-6)


def test_cpp_matches_torch_path_bit_for_bit(cpp_ops):
    """The compiled perturbation does the same fp32 operations as the foreach path, in the same order."""
    for dtype in DTYPES:
        for adaptive in (False, True):
            p1, grads = make(dtype, shapes=[(70, 33), (5,), (40000,)], seed=4)
            p2 = [torch.nn.Parameter(p.detach().clone()) for p in p1]
            s1 = uf.ops.sam_perturb_(p1, grads, 0.3, adaptive=adaptive, backend="torch")
            s2 = uf.ops.sam_perturb_(p2, grads, 0.3, adaptive=adaptive, backend="cpp")
            if torch.equal(s1.scale, s2.scale):
                assert all(torch.equal(bits(a.detach()), bits(b.detach())) for a, b in zip(p1, p2))
            else:  # the two norms sum in different orders; the updates are then within one ulp
                want = naive_perturbed([b for b in s1.backup], grads, 0.3, adaptive, scale=float(s2.scale))
                assert all(max_ulps(b.detach(), w, o) <= 1 for b, w, o in zip(p2, want, s1.backup))


def test_auto_backend_picks_cpp_on_cpu_when_vectorised(cpp_ops, monkeypatch):
    from unlearn_fast.ops import _cpp

    params, grads = make(torch.float32)
    monkeypatch.delenv("UNLEARN_FAST_SAM_BACKEND", raising=False)
    state = uf.ops.sam_perturb_(params, grads, 0.1)
    # a portable (unvectorised) build is not known to beat the foreach ops: auto keeps those
    assert state.backend == ("cpp" if _cpp.capability() != "default" else "torch")
    uf.ops.sam_restore_(state)
    # non-contiguous tensors go to the foreach path
    t = [p.detach().t() for p in params if p.dim() == 2]
    assert uf.ops.sam_perturb_(t, [x.clone() for x in t], 0.1).backend == "torch"


def test_no_cpp_env_forces_the_foreach_path(monkeypatch):
    from unlearn_fast.ops import _cpp

    monkeypatch.setenv("UNLEARN_FAST_NO_CPP", "1")
    params, grads = make(torch.float32)
    assert uf.ops.sam_perturb_(params, grads, 0.1).backend == "torch"
    with pytest.raises(RuntimeError, match="UNLEARN_FAST_NO_CPP"):
        _cpp.load()


def test_cpp_restore_large_mixed_list_bit_exact(cpp_ops):
    params, grads = make(torch.bfloat16, shapes=[(100_003,), (7, 7), (40_000,)], seed=5)
    before = [bits(p.detach()).clone() for p in params]
    state = uf.ops.sam_perturb_(params, grads, 1.0, backend="cpp")
    uf.ops.sam_restore_(state)
    assert all(torch.equal(bits(p.detach()), b) for p, b in zip(params, before))


def _tiny_mlp(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 5, bias=False),
                                torch.nn.LayerNorm(5)).to(dtype)
    model[3].bias.requires_grad_(False)  # a frozen parameter stays out of the flat buffer
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flatten_parameters_makes_views_of_one_buffer(dtype):
    model = _tiny_mlp(dtype)
    x = torch.randn(4, 9).to(dtype)
    want_out = model(x)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    flat = uf.flatten_parameters(model)
    assert len(flat.buffers) == 1
    buf = flat.buffers[0]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert buf.numel == sum(p.numel() for p in trainable)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), snapshot[name])
        if p.requires_grad:
            assert p.untyped_storage().data_ptr() == buf.data.untyped_storage().data_ptr()
            assert p.grad.untyped_storage().data_ptr() == buf.grad.untyped_storage().data_ptr()
        else:
            assert p.untyped_storage().data_ptr() != buf.data.untyped_storage().data_ptr()
    assert torch.equal(model(x), want_out)
    model(x).float().square().sum().backward()  # autograd accumulates into the flat gradient views
    assert buf.grad.abs().sum() > 0
    want = [p.grad.clone() for p in trainable]
    grads = [p.grad for p in trainable]
    from unlearn_fast.flatten import flat_groups

    groups = flat_groups(trainable, grads)
    assert groups is not None and len(groups) == 1 and groups[0][0].numel() == buf.numel
    flat.zero_grad()
    assert all(float(p.grad.abs().sum()) == 0 for p in trainable)
    assert all(p.grad.untyped_storage().data_ptr() == buf.grad.untyped_storage().data_ptr() for p in trainable)
    assert len(want) == len(grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adaptive", [False, True])
def test_triton_flat_path_single_run(dtype, adaptive):
    if not HAS_TRITON or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs triton")
    model = _tiny_mlp(dtype)
    flat = uf.flatten_parameters(model)
    model(torch.randn(3, 9).to(dtype)).float().sum().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    before = [p.detach().clone() for p in params]
    state = uf.ops.sam_perturb_(params, grads, 0.2, adaptive=adaptive, backend="triton")
    assert state.backend == "triton"
    want = naive_perturbed(before, grads, 0.2, adaptive, scale=float(state.scale))
    assert float(state.norm) == pytest.approx(naive_global_norm(grads, before if adaptive else None), rel=1e-6)
    for p, w, b in zip(params, want, before):
        assert max_ulps(p.detach(), w, b) <= 1.0
    uf.ops.sam_restore_(state)
    assert all(torch.equal(bits(p.detach()), bits(b)) for p, b in zip(params, before))
    assert flat.buffers[0].data.numel() == sum(p.numel() for p in params)


def test_triton_fd_hvp_accumulate():
    if not HAS_TRITON or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs triton")
    from unlearn_fast.kernels import multi_tensor as k

    g = torch.Generator().manual_seed(7)
    acc, gm, g0 = (torch.randn(700, generator=g) for _ in range(3))
    gm, g0 = gm.bfloat16(), g0.bfloat16()
    want = acc.double() + 2.5 * (gm.double() - g0.double())
    k.fd_hvp_accumulate_(acc, gm, g0, torch.tensor(2.5))
    assert torch.allclose(acc.double(), want, rtol=1e-6, atol=1e-6)
    want = acc.double() - 0.5 * gm.double()
    k.fd_hvp_accumulate_(acc, gm, None, torch.tensor(-0.5))
    assert torch.allclose(acc.double(), want, rtol=1e-6, atol=1e-6)


def test_cpp_loader_names_the_missing_tool(monkeypatch):
    from torch.utils import cpp_extension

    from unlearn_fast.ops import _cpp

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    missing = " ".join(_cpp._missing_tools(cuda=False))
    assert "ninja" in missing and "no-such-compiler-xyz" in missing
    assert (_cpp.source_dir() / "multi_tensor.cpp").exists()


# -- the host-tuned build -------------------------------------------------------------------------

def test_host_capability_follows_the_cpu_flags(monkeypatch):
    from unlearn_fast.ops import _cpp

    monkeypatch.delenv("UNLEARN_FAST_CPU_CAPABILITY", raising=False)
    monkeypatch.setattr(_cpp.platform, "machine", lambda: "x86_64")
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c", "sse4_2"}
    for flags, want in ((avx512, "avx512"), ({"avx2", "fma", "f16c"}, "avx2"), ({"avx512f", "avx2"}, "default"),
                        (set(), "default")):
        monkeypatch.setattr(_cpp, "cpu_flags", lambda flags=flags: flags)
        assert _cpp.host_capability() == want
    monkeypatch.setattr(_cpp.platform, "machine", lambda: "aarch64")
    assert _cpp.host_capability() == "default"
    monkeypatch.setenv("UNLEARN_FAST_CPU_CAPABILITY", "avx2")
    assert _cpp.host_capability() == "avx2"
    monkeypatch.setenv("UNLEARN_FAST_CPU_CAPABILITY", "sse9")
    with pytest.raises(ValueError, match="UNLEARN_FAST_CPU_CAPABILITY"):
        _cpp.host_capability()


def test_build_cache_key_covers_the_vector_flags(tmp_path, monkeypatch):
    from unlearn_fast.ops import _cpp

    monkeypatch.setenv("UNLEARN_FAST_CACHE", str(tmp_path))
    sources = [_cpp.source_dir() / "multi_tensor.cpp"]
    dirs = {cap: _cpp.build_dir_for(_cpp.compile_flags(cap), sources, False) for cap in ("avx512", "avx2", "default")}
    assert len(set(dirs.values())) == 3 and all(d.parent == tmp_path for d in dirs.values())
    assert "-ffp-contract=off" in _cpp.compile_flags("avx512") and "-DCPU_CAPABILITY_AVX512" in _cpp.compile_flags("avx512")
    with pytest.raises(ValueError, match="capability"):
        _cpp.compile_flags("avx1024")


def test_loaded_build_is_the_host_one(cpp_ops, monkeypatch):
    from unlearn_fast.ops import _cpp

    if os.environ.get("UNLEARN_FAST_CPU_CAPABILITY"):
        pytest.skip("capability forced")
    assert _cpp.capability() in (_cpp.host_capability(), "default")  # default only when the vector build failed


def _big_lists(dtype, seed):
    """A list over the streaming threshold (16 MiB), with odd lengths and a view that starts unaligned."""
    g = torch.Generator().manual_seed(seed)
    n = (17 << 20) // torch.empty((), dtype=dtype).element_size()
    base = torch.randn(n + 3, generator=g).to(dtype)
    params = [base[3:3 + n // 2 + 1], torch.randn(n // 2 - 1, generator=g).to(dtype),
              torch.randn(37, generator=g).to(dtype)]
    grads = [(1e-2 * torch.randn(p.shape, generator=g)).to(dtype) for p in params]
    return params, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adaptive", [False, True])
def test_cpp_streaming_path_matches_torch_and_restores_exactly(cpp_ops, dtype, adaptive):
    """Lists above the cache size take the non-temporal-store loops: same numbers, exact restore."""
    p_cpp, grads = _big_lists(dtype, seed=7)
    p_torch = [p.clone() for p in p_cpp]
    before = [bits(p).clone() for p in p_cpp]
    s_torch = uf.ops.sam_perturb_(p_torch, grads, 0.5, adaptive=adaptive, backend="torch")
    s_cpp = uf.ops.sam_perturb_(p_cpp, grads, 0.5, adaptive=adaptive, backend="cpp",
                                backup=[torch.empty_like(p) for p in p_cpp])
    assert all(torch.equal(bits(b), w) for b, w in zip(s_cpp.backup, before)), "the backup is θ bit for bit"
    if torch.equal(s_torch.scale, s_cpp.scale):
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(p_torch, p_cpp))
    else:
        want = naive_perturbed(s_torch.backup, grads, 0.5, adaptive, scale=float(s_cpp.scale))
        assert all(max_ulps(b, w, o) <= 1 for b, w, o in zip(p_cpp, want, s_torch.backup))
    assert all(not torch.equal(bits(p), b) for p, b in zip(p_cpp[:2], before)), "the big tensors must move"
    uf.ops.sam_restore_(s_cpp)
    assert all(torch.equal(bits(p), b) for p, b in zip(p_cpp, before))


def test_cpp_adamw_from_backup_streaming_matches_torch_adamw(cpp_ops):
    """The update that starts from the SAM backup writes θ with streaming stores on a big list."""
    params, grads = _big_lists(torch.float32, seed=8)
    params = [p.clone() for p in params]  # contiguous storage of their own
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    for r, o, g in zip(ref, ours, grads):
        r.grad, o.grad = g.clone(), g.clone()
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    fused = uf.optim.FusedAdamW(ours, lr=1e-2, weight_decay=0.1, backend="cpp")
    state = uf.ops.sam_perturb_(ours, grads, 0.3, backend="cpp")
    fused.step(sam_state=state)
    torch_opt.step()
    for r, o, p in zip(ref, ours, params):
        assert max_ulps(o.detach(), r.detach(), p) <= 2.0  # torch's AdamW rounds its steps in another order
        assert not torch.equal(o.detach(), p)


def _moved_by_a_separate_backup(dtype, adaptive, big, mt_backend, big_seed, seed):
    """Lists for a backup-placement test, and a twin moved with a fresh separate backup (the reference):
    (params, grads, twin, bits before, rho, the twin's state)."""
    if big and (mt_backend == "triton" or dtype == torch.float16):
        pytest.skip("the streaming sizes are a C++/foreach matter; one reduced dtype is enough")
    params, grads = _big_lists(dtype, seed=big_seed) if big else make(dtype, seed=seed)
    twin = [p.detach().clone() for p in params]
    before = [bits(p.detach()).clone() for p in params]
    rho = 0.5 if adaptive else 0.05
    separate = uf.ops.sam_perturb_(twin, [g.clone() for g in grads], rho, adaptive=adaptive, backend=mt_backend)
    return params, grads, twin, before, rho, separate


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("big", [False, True])
def test_direction_as_its_own_backup(dtype, adaptive, big, mt_backend):
    """backup=grads (SAM's consumed ascent direction): θ' bit for bit what a separate backup gives, the
    direction's storage holds θ afterwards, and the restore is exact; the big lists take the C++
    streaming stores (every element of g must be read before θ is written over it)."""
    params, grads, twin, before, rho, separate = _moved_by_a_separate_backup(dtype, adaptive, big, mt_backend, 11, 4)
    grads_ptrs = [g.data_ptr() for g in grads]
    state = uf.ops.sam_perturb_(params, grads, rho, adaptive=adaptive, backend=mt_backend, backup=grads)
    assert torch.equal(state.norm, separate.norm)
    assert [b.data_ptr() for b in state.backup] == grads_ptrs, "no buffer allocated: the grads hold θ"
    for p, t in zip(params, twin):
        assert torch.equal(bits(p.detach()), bits(t))
    assert all(torch.equal(bits(g), b) for g, b in zip(grads, before))
    uf.ops.sam_restore_(state)
    assert all(torch.equal(bits(p.detach()), b) for p, b in zip(params, before))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("consume", [False, True])
def test_exchange_matches_the_copy_path(dtype, adaptive, big, consume, mt_backend):
    """exchange=True: θ' is written into the backup, which trades storage with θ. The moved weights are
    bit for bit the copy path's, the backup holds θ, the restore trades back (each parameter on its own
    storage again, exact) and allocates nothing; a view (the big list's unaligned slice of a larger
    buffer) is copied instead. The Triton engine never exchanges."""
    params, grads, twin, before, rho, separate = _moved_by_a_separate_backup(dtype, adaptive, big, mt_backend, 12, 5)
    backup = grads if consume else [torch.empty_like(p) for p in params]
    p_ptrs, b_ptrs = [p.data_ptr() for p in params], [b.data_ptr() for b in backup]
    state = uf.ops.sam_perturb_(params, grads, rho, adaptive=adaptive, backend=mt_backend, backup=backup,
                                exchange=True)
    assert torch.equal(state.norm, separate.norm)
    owners = [p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in params]
    expected = [] if mt_backend == "triton" else [i for i, own in enumerate(owners) if own]
    assert [i for i, p in enumerate(params) if any(p is q for q, _ in state.exchanged)] == expected
    if big and mt_backend != "triton":
        assert expected == [1, 2], "the slice of a larger buffer is not exchanged"
    for i, (p, b, t) in enumerate(zip(params, backup, twin)):
        assert torch.equal(bits(p.detach()), bits(t)), f"θ'[{i}]"
        assert torch.equal(bits(b), before[i]), f"backup[{i}] holds θ"
        if i in expected:  # traded: no buffer written besides the backup's
            assert (p.data_ptr(), b.data_ptr()) == (b_ptrs[i], p_ptrs[i])
        else:
            assert p.data_ptr() == p_ptrs[i]
    uf.ops.sam_restore_(state)
    assert [p.data_ptr() for p in params] == p_ptrs
    assert all(torch.equal(bits(p.detach()), b) for p, b in zip(params, before))
    for i in expected:  # the backup got its storage back, now holding θ'
        assert backup[i].data_ptr() == b_ptrs[i] and torch.equal(bits(backup[i]), bits(twin[i]))


def test_exchange_leaves_shared_storage_alone(mt_backend):
    """A parameter that another tensor views keeps its storage: it is moved and restored by copy, and the
    alias sees θ' while moved. A live graph that saved a parameter sees the move as an in-place change
    (its backward fails, as it does on the copy path) instead of silently using θ'."""
    params, grads = make(torch.float32, seed=6)
    before = [p.detach().clone() for p in params]
    alias = params[0].view(-1)
    saved = torch.sin(params[1]).sum()  # sin saves its input
    state = uf.ops.sam_perturb_(params, grads, 0.05, backend=mt_backend, backup=grads, exchange=True)
    exchanged = {id(p) for p, _ in state.exchanged}
    assert id(params[0]) not in exchanged
    assert torch.equal(alias, params[0].detach().view(-1)) and not torch.equal(alias, before[0].view(-1))
    if mt_backend != "triton":
        assert len(exchanged) == len(params) - 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()
    uf.ops.sam_restore_(state)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_exchanged_state_restored_by_the_fused_update_and_fd_hvp(cpp_ops):
    """FusedAdamW.step(sam_state=...) and fd_hvp_accumulate_(restore=...) take an exchanged state: the
    update is the one a restore-then-step gives, and the accumulation leaves θ exact."""
    params, grads = make(torch.float32, seed=7)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, r, g in zip(params, ref, grads):
        p.grad, r.grad = g.clone(), g.clone()
    fused = uf.optim.FusedAdamW(params, lr=1e-2, weight_decay=0.1, backend="cpp")
    plain = uf.optim.FusedAdamW(ref, lr=1e-2, weight_decay=0.1, backend="cpp")
    state = uf.ops.sam_perturb_(params, [g.clone() for g in grads], 0.3, backend="cpp",
                                backup=[torch.empty_like(p) for p in params], exchange=True)
    assert len(state.exchanged) == len(params)
    fused.step(sam_state=state)
    plain.step()
    assert state.restored and not state.exchanged
    assert all(torch.equal(p.detach(), r.detach()) for p, r in zip(params, ref))

    before = [p.detach().clone() for p in params]
    acc = [torch.zeros_like(p) for p in params]
    state = uf.ops.sam_perturb_(params, [g.clone() for g in grads], 0.3, backend="cpp",
                                backup=[torch.empty_like(p) for p in params], exchange=True)
    uf.ops.fd_hvp_accumulate_(acc, grads, None, 2.0, restore=state, backend="cpp")
    assert state.restored
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert all(torch.equal(a, 2.0 * g) for a, g in zip(acc, grads))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_session.sh tests)")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("exchange", [False, True])
def test_cuda_kernels_match_the_foreach_path(dtype, adaptive, exchange):
    """The CUDA multi-tensor kernels (perturb with backup, perturb into the backup for the exchange, restore)
    against the torch path on the same device: θ' within one rounding, the restore exact."""
    params, grads = make(dtype, seed=9)
    params = [torch.nn.Parameter(p.detach().cuda()) for p in params]
    grads = [g.cuda() for g in grads]
    twin = [p.detach().clone() for p in params]
    theta = [p.detach().cpu().clone() for p in params]
    before = [bits(p.detach()).clone() for p in params]
    rho = 0.5 if adaptive else 0.05
    want = uf.ops.sam_perturb_(twin, [g.clone() for g in grads], rho, adaptive=adaptive, backend="torch")
    state = uf.ops.sam_perturb_(params, grads, rho, adaptive=adaptive, backend="cpp", backup=grads, exchange=exchange)
    assert len(state.exchanged) == (len(params) if exchange else 0)
    assert torch.allclose(state.norm, want.norm, rtol=1e-6)
    for p, t, th in zip(params, twin, theta):  # the norm's reduction order may differ: a rounding of the scale
        assert max_ulps(p.detach().cpu(), t.cpu(), th) <= 2.0
    uf.ops.sam_restore_(state)
    assert all(torch.equal(bits(p.detach()), b) for p, b in zip(params, before))
