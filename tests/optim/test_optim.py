"""uf.optim: FusedAdamW against torch.optim.AdamW, SAM step semantics (SPEC §1.3), finite-difference HVP
against double backprop, the GP gradient (SPEC §1.4), backup-less perturbation with fp32 masters."""
from __future__ import annotations

import copy

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.ops import _cpp


@pytest.fixture(scope="session")
def cpp_built():
    if _cpp.disabled():
        pytest.skip("UNLEARN_FAST_NO_CPP=1")
    return _cpp.load()


@pytest.fixture(params=["torch", "cpp"])
def engine(request):
    if request.param == "cpp":
        request.getfixturevalue("cpp_built")
    return request.param


def bits(t):
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, torch.int16))


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(13, 7), (7,), (3, 5, 2), (1,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]


def grads_for(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]


# -- FusedAdamW ----------------------------------------------------------------------------------

def step_both(pairs, steps):
    """The same gradients into each (params, optimizer) pair, then a step of each, for every step in ``steps``."""
    for step in steps:
        for ps, _ in pairs:
            for p, g in zip(ps, grads_for(ps, step)):
                p.grad = g
        for _, opt in pairs:
            opt.step()


def test_fused_adamw_matches_torch_adamw_20_steps(engine):
    ours, ref = make_params(), make_params()
    kw = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    opt = uf.optim.FusedAdamW(ours, **kw, backend=engine)
    opt_ref = torch.optim.AdamW(ref, **kw, foreach=False)
    step_both([(ours, opt), (ref, opt_ref)], range(20))
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not any(torch.allclose(a, s) for a, s in zip(ours, make_params()))  # the weights did move
    for a, b in zip(opt.state.values(), opt_ref.state.values()):
        assert float(a["step"]) == float(b["step"]) == 20
        assert torch.allclose(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-6, atol=1e-9)


def test_fused_adamw_state_dict_moves_to_and_from_torch_adamw(engine):
    kw = dict(lr=1e-2, weight_decay=0.05)
    ref = make_params()
    opt_ref = torch.optim.AdamW(ref, **kw, foreach=False)
    step_both([(ref, opt_ref)], range(3))
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt = uf.optim.FusedAdamW(ours, lr=0.5, backend=engine)  # hyper-parameters come from the state dict
    opt.load_state_dict(copy.deepcopy(opt_ref.state_dict()))  # as from a checkpoint: no shared tensors
    assert opt.param_groups[0]["lr"] == 1e-2
    step_both([(ours, opt), (ref, opt_ref)], range(3, 6))
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    back = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in ours], lr=1.0)
    back.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert float(back.state_dict()["state"][0]["step"]) == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_with_sam_state_equals_restore_then_step(engine, dtype):
    runs = []
    for fused in (False, True):
        params = make_params(dtype)
        opt = uf.optim.FusedAdamW(params, lr=1e-2, weight_decay=0.1, backend=engine)
        for step in range(3):
            grads = grads_for(params, step)
            state = uf.ops.sam_perturb_(params, grads, 0.05, backend=engine)
            for p, g in zip(params, grads_for(params, 100 + step)):
                p.grad = g
            if fused:
                opt.step(sam_state=state)
                assert state.restored
            else:
                uf.ops.sam_restore_(state)
                opt.step()
        runs.append([bits(p.detach()).clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_step_with_sam_state_restores_moved_params_without_grad(engine):
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = uf.optim.FusedAdamW(params[:2], lr=1e-2, backend=engine)
    state = uf.ops.sam_perturb_(params, grads_for(params, 0), 0.1, backend=engine)
    params[0].grad = torch.ones_like(params[0])
    opt.step(sam_state=state)
    for p, b in zip(params[1:], before[1:]):  # no gradient / not in the optimizer: plain restore
        assert torch.equal(p.detach(), b)
    assert not torch.equal(params[0].detach(), before[0])


def test_fused_adamw_bad_input():
    with pytest.raises(ValueError, match="lr"):
        uf.optim.FusedAdamW(make_params(), lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        uf.optim.FusedAdamW(make_params(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="weight_decay"):
        uf.optim.FusedAdamW(make_params(), weight_decay=-0.1)
    opt = uf.optim.FusedAdamW(make_params())
    with pytest.raises(TypeError, match="sam_state"):
        opt.step(sam_state="x")


# -- SAM -----------------------------------------------------------------------------------------

def _tiny_problem(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)
    xf, yf = torch.randn(5, 6, dtype=dtype), torch.randint(0, 3, (5,))
    xr, yr = torch.randn(7, 6, dtype=dtype), torch.randint(0, 3, (7,))

    def forget():
        return -torch.nn.functional.cross_entropy(model(xf), yf)

    def retain():
        return torch.nn.functional.cross_entropy(model(xr), yr)

    return model, forget, retain


def test_sam_step_follows_spec_order(engine):
    model, forget, retain = _tiny_problem()
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]
    rho, cf, cr = 0.05, 1.5, 2.0
    # naive reference: per-parameter clones
    g = torch.autograd.grad(forget(), params)
    n = torch.sqrt(sum((x ** 2).sum() for x in g))
    with torch.no_grad():
        for p, x in zip(params, g):
            p.add_(rho * x / n)
    g_f = torch.autograd.grad(forget(), params)
    with torch.no_grad():
        for p, t in zip(params, theta):
            p.copy_(t)
    g_r = torch.autograd.grad(retain(), params)
    want = [cf * a + cr * b for a, b in zip(g_f, g_r)]

    sam = uf.optim.SAM(params, rho=rho, backend=engine)
    out = sam.step(forget, retain, forget_weight=cf, retain_weight=cr)
    for p, w, t in zip(params, want, theta):
        assert torch.allclose(p.grad, w, rtol=1e-6, atol=1e-9)  # s is an fp32 scalar (SPEC: fp32 norm)
        assert torch.equal(p.detach(), t)  # restored exactly
    assert float(out["sam_norm"]) == pytest.approx(float(n), rel=1e-6)
    assert sam.state is None


def test_sam_step_pending_restore_with_fused_adamw_equals_plain(engine):
    results = []
    for pending in (False, True):
        model, forget, retain = _tiny_problem(torch.float32, seed=3)
        params = list(model.parameters())
        sam = uf.optim.SAM(params, rho=0.02, backend=engine)
        opt = uf.optim.FusedAdamW(params, lr=1e-2, backend=engine)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            out = sam.step(forget, retain, restore=not pending)
            if pending:
                opt.step(sam_state=out["sam_state"])
                sam.consumed(out["sam_state"])
            else:
                opt.step()
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_sam_helper_perturb_restore_and_errors(engine):
    params = make_params(torch.bfloat16)
    before = [bits(p.detach()).clone() for p in params]
    sam = uf.optim.SAM(params, rho=0.1, adaptive=True, backend=engine)
    for _ in range(2):  # the backup buffer is reused
        with sam.perturbed(grads_for(params, 0)):
            assert not all(torch.equal(bits(p.detach()), b) for p, b in zip(params, before))
            with pytest.raises(RuntimeError, match="already perturbed"):
                sam.perturb(grads_for(params, 0))
        assert all(torch.equal(bits(p.detach()), b) for p, b in zip(params, before))
    with pytest.raises(RuntimeError, match="not perturbed"):
        sam.restore()
    with pytest.raises(ValueError, match="rho"):
        uf.optim.SAM(params, rho=-1)
    with pytest.raises(TypeError, match="params"):
        uf.optim.SAM([torch.zeros(3, dtype=torch.int64)])


def test_backupless_perturbation_is_undone_by_fp32_masters(engine):
    masters = make_params(torch.float32)
    model_w = [torch.nn.Parameter(m.detach().to(torch.bfloat16)) for m in masters]
    before = [bits(p.detach()).clone() for p in model_w]
    state = uf.ops.sam_perturb_(model_w, grads_for(model_w, 0), 0.1, keep_backup=False, backend=engine)
    assert state.backup == [] and not all(torch.equal(bits(p.detach()), b) for p, b in zip(model_w, before))
    with pytest.raises(RuntimeError, match="no backup"):
        uf.ops.sam_restore_(state)
    uf.optim.restore_from_masters(state, [m.detach() for m in masters])
    assert all(torch.equal(bits(p.detach()), b) for p, b in zip(model_w, before))


# -- finite-difference Hessian-vector products -----------------------------------------------------

def _exact_hvp(params, loss_fn, v):
    g = torch.autograd.grad(loss_fn(), params, create_graph=True)
    return torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, v)), params)


@pytest.mark.parametrize("dtype,r,tol", [(torch.float64, 1e-6, 1e-4), (torch.float32, 1e-2, 1e-2)])
def test_fd_hvp_matches_double_backprop(engine, dtype, r, tol):
    model, forget, _ = _tiny_problem(dtype, seed=1)
    params = list(model.parameters())
    theta = [bits(p.detach()).clone() for p in params]
    gen = torch.Generator().manual_seed(5)
    v = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in params]
    want = _exact_hvp(params, forget, v)
    got = uf.optim.fd_hvp(params, forget, v, r, backend=engine)
    num = torch.sqrt(sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(got, want)))
    den = torch.sqrt(sum((b.double() ** 2).sum() for b in want))
    assert float(num / den) < tol
    assert all(torch.equal(bits(p.detach()), t) for p, t in zip(params, theta))


def test_gradient_penalty_grad_matches_double_backprop(engine):
    model, forget, _ = _tiny_problem(torch.float64, seed=2)
    params = list(model.parameters())
    gamma = 0.3
    g = torch.autograd.grad(forget(), params, create_graph=True)
    norm = torch.sqrt(sum((x ** 2).sum() for x in g))
    want = torch.autograd.grad(forget() + gamma * norm, params)
    got, loss = uf.optim.gradient_penalty_grad(params, forget, gamma, r=1e-6, backend=engine)
    num = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(got, want)))
    assert float(num / torch.sqrt(sum((b ** 2).sum() for b in want))) < 1e-4
    assert float(loss) == pytest.approx(float(forget().detach()))


@pytest.mark.parametrize("acc_dtype,g_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float32),
                                               (torch.bfloat16, torch.bfloat16)])
def test_fd_hvp_accumulate_op_against_naive(engine, acc_dtype, g_dtype):
    gen = torch.Generator().manual_seed(9)
    shapes = [(33, 4), (5,), (1000,)]
    acc = [torch.randn(s, generator=gen).to(acc_dtype) for s in shapes]
    gm = [torch.randn(s, generator=gen).to(g_dtype) for s in shapes]
    g0 = [torch.randn(s, generator=gen).to(g_dtype) for s in shapes]
    params = make_params(torch.float32)
    before = [p.detach().clone() for p in params]
    state = uf.ops.sam_perturb_(params, grads_for(params, 0), 0.1, backend=engine)
    want = [(a.double() + 0.75 * (x.double() - y.double())).to(acc_dtype) for a, x, y in zip(acc, gm, g0)]
    uf.ops.fd_hvp_accumulate_(acc, gm, g0, torch.tensor(0.75), restore=state, backend=engine)
    for a, w in zip(acc, want):
        # fp32 arithmetic then one rounding: within one ulp of the fp64 result (at the operands' scale)
        assert torch.allclose(a.double(), w.double(), rtol=2 * torch.finfo(acc_dtype).eps, atol=1e-6)
    assert state.restored and all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    with pytest.raises(ValueError, match=r"g_moved\[0\]"):
        uf.ops.fd_hvp_accumulate_(acc, [gm[1]] + gm[1:], None, 1.0)


def test_sam_step_with_fp32_masters_needs_no_backup(engine):
    """bf16 model weights + fp32 masters: perturb without backup, model ← round(master) undoes it exactly."""
    grads_seen = []
    for keep in (True, False):
        model, forget, retain = _tiny_problem(torch.bfloat16, seed=4)
        params = list(model.parameters())
        masters = [p.detach().float().clone() for p in params]
        before = [bits(p.detach()).clone() for p in params]
        sam = uf.optim.SAM(params, rho=0.05, backend=engine)
        out = sam.step(forget, retain, restore=keep, keep_backup=keep)
        if not keep:
            assert out["sam_state"].backup == [] and sam.state is None
            uf.optim.restore_from_masters(out["sam_state"], masters)
        assert all(torch.equal(bits(p.detach()), b) for p, b in zip(params, before))
        grads_seen.append([p.grad.clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*grads_seen))
    with pytest.raises(ValueError, match="keep_backup"):
        uf.optim.SAM(params).step(forget, keep_backup=False)
