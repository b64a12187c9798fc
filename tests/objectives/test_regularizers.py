"""The robustness regularisers of uf.unlearning_gradients against naive references (SPEC §1.2–§1.4).

SAM, ILU (logit_unbiased, param_scalar, param_elementwise), RS, GP, CR on a tiny
Llama; WA (uf.WeightAverager) and the reference-NLL cache (uf.reference_nll).
The finite-difference regularisers are compared in float64 against the exact
gradient of their objective by double backprop; each test also checks that the
regulariser's contribution is far above the tolerance, so a wrong sign or weight fails.
"""
import copy

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.testing import reference_objectives as ref
from tests.objectives.test_objectives import assert_rel_close, naive_grads, ours_grads, params_of
from unlearn_fast.testing.tiny import make_batch, tiny_llama


def rel_diff(a, b):
    num = torch.sqrt(sum(((x.double() - y.double()) ** 2).sum() for x, y in zip(a, b)))
    return float(num / torch.sqrt(sum((y.double() ** 2).sum() for y in b)))


def grads_kept(model, loss):
    """∇loss w.r.t. the trainable parameters, keeping the graph (the naive terms share their forwards)."""
    return list(torch.autograd.grad(loss, params_of(model), retain_graph=True))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model, before):
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "weights not restored bit-exactly"


@pytest.fixture(scope="module")
def fp32():
    model = tiny_llama(layers=2, seed=11)
    start = copy.deepcopy(model)
    forget, retain = make_batch(21), make_batch(22)
    with torch.no_grad():
        forget["ref_nll"] = ref.sequence_nll(start, forget)[0]
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, start, forget, retain


def _rms_norm_in_input_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _attention_in_input_dtype(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    groups = module.num_key_value_groups
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


@pytest.fixture
def fp64(monkeypatch):
    """A float64 tiny Llama that is float64 throughout.

    HF's Llama computes RMSNorm and the attention softmax in fp32 even for fp64 weights;
    that ~1e-8 noise, divided by the finite-difference step, would swamp the comparison,
    so those two functions are replaced by input-dtype versions for these tests.
    """
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", _attention_in_input_dtype)
    model = tiny_llama(layers=1, seed=12, dtype=torch.float64)
    forget, env = make_batch(31, batch=2, length=8), make_batch(32, batch=2, length=8)
    return model, forget, env


# ---------------------------------------------------------------- SAM (SPEC §1.3)

@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_matches_cloned_parameter_sam(fp32, adaptive):
    model, start, forget, retain = fp32
    rho = 0.5 if adaptive else 0.05  # large enough that the perturbed gradient clearly differs
    conf = uf.UnlearnConfig(method="npo", retain_weight=1.5, forget_weight=0.8, sam_rho=rho, sam_adaptive=adaptive)
    before = snapshot(model)
    grads, metrics = ours_grads(model, forget, retain, (), conf)
    assert_bit_identical(model, before)  # exact restore, no drift from θ + ε − ε

    forget_fn = lambda: ref.naive_forget_loss(model, forget, conf, start)  # noqa: E731
    g_f = ref.naive_sam_gradients(model, forget_fn, rho, adaptive)
    g_r = naive_grads(model, conf.retain_weight * ref.naive_retain_loss(model, retain, conf))  # at θ, unperturbed
    naive = [conf.forget_weight * a + b for a, b in zip(g_f, g_r)]
    assert_rel_close(grads, naive, 1e-3)
    assert metrics["sam_norm"] > 0

    # The test can fail: plain (unperturbed) forget gradient, or the retain gradient taken at the
    # perturbed weights, are both far from ours.
    plain = naive_grads(model, conf.forget_weight * forget_fn())
    assert rel_diff([a + b for a, b in zip(plain, g_r)], naive) > 1e-2
    retain_fn = lambda: conf.retain_weight * ref.naive_retain_loss(model, retain, conf)  # noqa: E731
    wrong_r = ref.naive_sam_gradients(model, forget_fn, rho, adaptive, loss_fn=retain_fn)
    assert rel_diff([conf.forget_weight * a + b for a, b in zip(g_f, wrong_r)], naive) > 1e-2


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_exchange_gives_the_copy_path_gradient_bit_for_bit(fp32, adaptive, monkeypatch):
    """The trainer's SAM trades storage (θ' written into the consumed direction): every parameter of the
    model is traded, the gradient is bit for bit the copy path's, and each weight ends on its own storage."""
    from unlearn_fast.objectives import regularizers

    model, _, forget, retain = fp32
    conf = uf.UnlearnConfig(method="npo", retain_weight=1.5, sam_rho=0.5 if adaptive else 0.05, sam_adaptive=adaptive)
    perturb, traded = regularizers.ops.sam_perturb_, []

    def spy(*args, exchange=False, force=None, **kwargs):
        state = perturb(*args, exchange=exchange if force is None else force, **kwargs)
        traded.append(len(state.exchanged))
        return state

    ptrs = [p.data_ptr() for p in params_of(model)]
    monkeypatch.setattr(regularizers.ops, "sam_perturb_", spy)
    exchanged, _ = ours_grads(model, forget, retain, (), conf)
    monkeypatch.setattr(regularizers.ops, "sam_perturb_", lambda *a, **k: spy(*a, force=False, **k))
    copied, _ = ours_grads(model, forget, retain, (), conf)
    assert traded == [len(params_of(model)), 0]
    assert all(torch.equal(a, b) for a, b in zip(exchanged, copied))
    assert [p.data_ptr() for p in params_of(model)] == ptrs


def test_sam_zero_gradient_gives_zero_perturbation():
    # GA on a batch with no answer token: ∇ℓ_f = 0, so n = 0 must move nothing (no NaN).
    model = tiny_llama(layers=1, seed=13)
    batch = make_batch(40)
    batch["labels"][:] = -100
    before = snapshot(model)
    grads, metrics = ours_grads(model, batch, None, (), uf.UnlearnConfig(method="ga", sam_rho=0.01))
    assert metrics["sam_norm"] == 0.0
    assert all(torch.isfinite(g).all() and not g.any() for g in grads)
    assert_bit_identical(model, before)


# ---------------------------------------------------------------- ILU, unbiased logit reading (SPEC §1.2a)

def test_ilu_logit_unbiased_matches_per_half_double_backprop(fp32):
    model, start, forget, retain = fp32
    envs = [make_batch(50, batch=4), make_batch(51, batch=3, length=9), make_batch(52, batch=5, length=7)]
    # a row without any answer token does not take a half: the halves alternate over the other rows
    envs[2]["labels"][1] = -100
    conf = uf.UnlearnConfig(method="ga", irm="logit_unbiased", irm_weight=50.0)
    grads, metrics = ours_grads(model, forget, None, envs, conf)
    penalty = ref.naive_irm_unbiased_penalty(model, envs)
    assert metrics["irm_penalty"] == pytest.approx(float(penalty.detach()), rel=1e-4, abs=1e-7)
    forget_part = naive_grads(model, ref.naive_forget_loss(model, forget, conf))
    naive = naive_grads(model, ref.naive_forget_loss(model, forget, conf) + conf.irm_weight * penalty)
    assert_rel_close(grads, naive, 1e-3)
    assert rel_diff(forget_part, naive) > 1e-2  # the penalty's gradient is visible at this tolerance
    biased = naive_grads(model, ref.naive_forget_loss(model, forget, conf)
                         + conf.irm_weight * ref.naive_irm_penalty(model, envs))
    assert rel_diff(biased, naive) > 1e-2  # and differs from the biased penalty's


# ---------------------------------------------------------------- ILU, parameter readings (SPEC §1.2b/c)

@pytest.mark.parametrize("reading, weight", [("param_scalar", 0.3), ("param_elementwise", 30.0)])
def test_param_irm_fd_matches_double_backprop_fp64(fp64, reading, weight):
    model, forget, env = fp64
    conf = uf.UnlearnConfig(method="ga", irm=reading, irm_weight=weight, irm_fd_step=1e-6)
    before = snapshot(model)
    grads, metrics = ours_grads(model, forget, None, [env], conf)
    assert_bit_identical(model, before)
    assert all(g.dtype == torch.float64 for g in grads)

    params = params_of(model)
    forget_loss = ref.naive_forget_loss(model, forget, conf)
    penalty = ref.naive_param_irm_penalty(model, params, [env], reading)
    assert metrics["irm_penalty"] == pytest.approx(float(penalty.detach()), rel=1e-9)
    naive = grads_kept(model, forget_loss + weight * penalty)
    # FD Hessian-vector product with r = 1e-6 in float64: truncation O(r), rounding O(1e-16 / r)
    assert_rel_close(grads, naive, 1e-5)
    g_forget = grads_kept(model, forget_loss)
    g_penalty = grads_kept(model, weight * penalty)
    assert rel_diff(g_forget, naive) > 1e-2, "penalty gradient too small for the test to mean anything"
    # the Hessian term matters: dropping it, or flipping the penalty's sign, fails the tolerance
    assert rel_diff([a - b for a, b in zip(g_forget, g_penalty)], naive) > 1e-2


# ---------------------------------------------------------------- RS (SPEC §1.4)

def rs_noise(seed, k, p, i):
    """The RS noise of sample k, tensor i, as regularizers.rs_forget regenerates it."""
    gen = torch.Generator(device=p.device).manual_seed(hash((seed, k, i)) & 0x7FFFFFFFFFFF)
    return torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).to(p.dtype)


def test_rs_matches_average_over_seeded_perturbations(fp32):
    model, start, forget, retain = fp32
    sigma, samples, step = 0.05, 3, 7  # σ large enough that the noisy gradient clearly differs
    conf = uf.UnlearnConfig(method="npo", retain_weight=0.5, rs_samples=samples, rs_sigma=sigma, seed=5)
    before = snapshot(model)
    grads, _ = ours_grads(model, forget, retain, (), conf, step=step)
    assert_bit_identical(model, before)  # the noise is removed exactly, not subtracted
    # Regenerated, not stored: nothing noise-sized is left on the model or in its __dict__.
    assert not any(isinstance(v, torch.Tensor) for v in model.__dict__.values())

    params = params_of(model)
    seed = hash((conf.seed, step))
    forget_at = lambda ps: ref.naive_forget_loss(ref.model_at(model, ps), forget, conf, start)  # noqa: E731
    avg = [torch.zeros_like(p) for p in params]
    for k in range(samples):
        moved = [(p.detach() + sigma * rs_noise(seed, k, p, i)).requires_grad_() for i, p in enumerate(params)]
        for a, g in zip(avg, torch.autograd.grad(forget_at(moved), moved)):
            a.add_(g / samples)
    g_r = naive_grads(model, conf.retain_weight * ref.naive_retain_loss(model, retain, conf))
    naive = [a + b for a, b in zip(avg, g_r)]
    assert_rel_close(grads, naive, 1e-3)
    plain = naive_grads(model, ref.naive_forget_loss(model, forget, conf, start))
    assert rel_diff([a + b for a, b in zip(plain, g_r)], naive) > 1e-2
    # a different step draws different noise
    other, _ = ours_grads(model, forget, retain, (), conf, step=step + 1)
    assert rel_diff(other, grads) > 1e-3


# ---------------------------------------------------------------- GP and CR (SPEC §1.4)

def test_gp_fd_matches_double_backprop_fp64(fp64):
    model, forget, _ = fp64
    gamma, r = 0.05, 1e-6
    conf = uf.UnlearnConfig(method="ga", forget_weight=0.7, gp_weight=gamma, gp_step=r)
    before = snapshot(model)
    grads, _ = ours_grads(model, forget, None, (), conf)
    assert_bit_identical(model, before)
    params = params_of(model)
    forget_at = lambda ps: ref.naive_forget_loss(ref.model_at(model, ps), forget, conf)  # noqa: E731
    loss = forget_at(params)
    objective = conf.forget_weight * (loss + gamma * ref.naive_grad_norm(params, forget_at))
    naive = grads_kept(model, objective)
    assert_rel_close(grads, naive, 1e-5)
    plain = grads_kept(model, conf.forget_weight * loss)
    assert rel_diff(plain, naive) > 1e-2


def test_cr_fd_matches_double_backprop_fp64(fp64):
    model, forget, _ = fp64
    gamma, h, r = 20.0, 0.01, 1e-6
    conf = uf.UnlearnConfig(method="ga", forget_weight=0.7, cr_weight=gamma, cr_step=h, fd_step=r)
    before = snapshot(model)
    grads, metrics = ours_grads(model, forget, None, (), conf)
    assert_bit_identical(model, before)
    params = params_of(model)
    forget_at = lambda ps: ref.naive_forget_loss(ref.model_at(model, ps), forget, conf)  # noqa: E731
    loss = forget_at(params)
    curvature = ref.naive_cr_regulariser(model, params, forget_at, h)
    assert metrics["curvature"] == pytest.approx(float(curvature.detach()), rel=1e-6)
    naive = grads_kept(model, conf.forget_weight * (loss + gamma * curvature))
    # Two nested FD Hessian-vector products: truncation error O(r), measured ≈ 14·r relative here
    # (1.4e-3 at r = 1e-4, 1.4e-5 at r = 1e-6), so 1e-4 at r = 1e-6.
    assert_rel_close(grads, naive, 1e-4)
    plain = grads_kept(model, conf.forget_weight * loss)
    assert rel_diff(plain, naive) > 1e-2


# ---------------------------------------------------------------- WA (SPEC §1.4)

def test_weight_averager_is_the_running_mean_of_due_steps():
    model = tiny_llama(layers=1, seed=14)
    model.model.norm.weight.requires_grad_(False)  # frozen weights are not averaged
    wa = uf.WeightAverager(model, start=3, every=2)
    kept = []
    for step in range(10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        if wa.update(model, step):
            kept.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert [s for s in range(10) if wa.due(s)] == [3, 5, 7, 9] and len(kept) == 4
    frozen = model.model.norm.weight.detach().clone()
    wa.copy_to(model)
    params = dict(model.named_parameters())
    for name in kept[0]:
        manual = torch.stack([s[name] for s in kept]).mean(0)
        torch.testing.assert_close(params[name].detach(), manual, rtol=1e-6, atol=1e-6)
    assert "model.norm.weight" not in wa.average and torch.equal(params["model.norm.weight"], frozen)
    # resume: a restored averager continues the same mean
    clone = uf.WeightAverager(model, start=3, every=2)
    clone.load_state_dict(wa.state_dict())
    assert clone.count == 4
    with pytest.raises(ValueError, match="every"):
        uf.WeightAverager(model, every=0)


# ---------------------------------------------------------------- reference NLL cache (SPEC §1.1)

def examples_of(seed, n=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 5 + i
        ids = torch.randint(1, 97, (length,), generator=g)
        labels = ids.clone()
        labels[:2] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def naive_nll(model, examples):
    with torch.no_grad():
        return torch.stack([ref.sequence_nll(model, {"input_ids": ex["input_ids"][None], "labels": ex["labels"][None],
                                                     "attention_mask": torch.ones(1, len(ex["input_ids"]))})[0][0]
                            for ex in examples])


def test_reference_nll_values_and_cache(tmp_path, monkeypatch):
    model = tiny_llama(layers=1, seed=15)
    examples = examples_of(0)
    values = uf.reference_nll(model, examples, batch_size=2, cache_dir=tmp_path)
    torch.testing.assert_close(values, naive_nll(model, examples), rtol=1e-5, atol=1e-5)
    assert len(list(tmp_path.iterdir())) == 1

    # second call: read from the cache, the model is not run
    def refuse(*args, **kwargs):
        raise AssertionError("model ran although the cache holds this model and data")

    with monkeypatch.context() as m:
        m.setattr(model.model, "forward", refuse)
        assert torch.equal(uf.reference_nll(model, examples, cache_dir=tmp_path), values)

    # changed data (one label): a new fingerprint, recomputed
    changed = copy.deepcopy(examples)
    changed[3]["labels"][4] = -100
    again = uf.reference_nll(model, changed, cache_dir=tmp_path)
    torch.testing.assert_close(again, naive_nll(model, changed), rtol=1e-5, atol=1e-5)
    assert not torch.equal(again, values) and len(list(tmp_path.iterdir())) == 2

    # changed model: one weight entry anywhere (not just a sampled one) gives a new fingerprint
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[5, 7] += 0.5
    moved = uf.reference_nll(model, examples, cache_dir=tmp_path)
    torch.testing.assert_close(moved, naive_nll(model, examples), rtol=1e-5, atol=1e-5)
    assert not torch.equal(moved, values) and len(list(tmp_path.iterdir())) == 3
