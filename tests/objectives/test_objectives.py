"""uf.unlearning_gradients against the naive objectives of unlearn_fast/testing/reference_objectives.py on a tiny Llama."""
import copy

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.testing import reference_objectives as ref
from unlearn_fast.testing.tiny import make_batch, tiny_llama


def params_of(model):
    return [p for p in model.parameters() if p.requires_grad]


def ours_grads(model, *args, **kwargs):
    model.zero_grad(set_to_none=True)
    metrics = uf.unlearning_gradients(model, *args, **kwargs)
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params_of(model)]
    model.zero_grad(set_to_none=True)
    return grads, metrics


def naive_grads(model, loss):
    grads = torch.autograd.grad(loss, params_of(model), allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params_of(model))]


def assert_rel_close(ours, naive, tol):
    num = torch.sqrt(sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(ours, naive)))
    den = torch.sqrt(sum((b.double() ** 2).sum() for b in naive))
    assert den > 0, "reference gradient is zero: the test would not check anything"
    assert num / den < tol, f"relative gradient error {float(num / den):.2e} >= {tol}"


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama()
    start = copy.deepcopy(model)
    forget, retain = make_batch(1), make_batch(2)
    envs = [make_batch(3, batch=2), make_batch(4, batch=2, length=9)]
    with torch.no_grad():
        forget["ref_nll"] = ref.sequence_nll(start, forget)[0]
    # move the model away from its start so that NPO's reference term matters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, start, forget, retain, envs


METHOD_CASES = [
    dict(method="ga"),
    dict(method="graddiff", retain_weight=0.7),
    dict(method="npo", beta=0.1),
    dict(method="npo", beta=0.5, npo_form="batch_mean", retain_weight=2.0),
    dict(method="simnpo", beta=2.5, simnpo_delta=0.5),
    dict(method="npo", retain_loss="kl", retain_weight=1.5),
    dict(method="npo", irm="logit", irm_weight=0.8),
    dict(method="graddiff", irm="logit", irm_weight=2.0, forget_weight=0.5),
]


@pytest.mark.parametrize("case", METHOD_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_method_gradient_matches_naive(setup, case):
    model, start, forget, retain, envs = setup
    conf = uf.UnlearnConfig(**case)
    env_batches = envs if conf.irm else ()
    grads, metrics = ours_grads(model, forget, retain, env_batches, conf, ref_model=start)
    loss = conf.forget_weight * ref.naive_forget_loss(model, forget, conf, start)
    if conf.uses_retain:
        loss = loss + conf.retain_weight * ref.naive_retain_loss(model, retain, conf, start)
    if conf.irm:
        loss = loss + conf.irm_weight * ref.naive_irm_penalty(model, envs)
    assert_rel_close(grads, naive_grads(model, loss), 1e-3)
    assert metrics["loss"] == pytest.approx(float(loss), rel=1e-3, abs=1e-5)


def test_tied_embeddings_gradient_matches_naive():
    model = tiny_llama(tie=True, seed=3)
    forget = make_batch(5)
    conf = uf.UnlearnConfig(method="ga")
    grads, _ = ours_grads(model, forget, None, (), conf)
    assert_rel_close(grads, naive_grads(model, ref.naive_forget_loss(model, forget, conf)), 1e-3)


def test_npo_step_raises_forget_nll(setup):
    model, start, forget, retain, envs = setup
    model = copy.deepcopy(model)
    before = ref.sequence_nll(model, forget)[0].sum()
    uf.unlearning_gradients(model, forget, None, (), uf.UnlearnConfig(method="npo", retain_weight=0.0))
    with torch.no_grad():
        for p in params_of(model):
            p.sub_(0.05 * p.grad)
    after = ref.sequence_nll(model, forget)[0].sum()
    assert after > before


def test_bf16_npo_ilu_close_to_fp32(setup):
    model, start, forget, retain, envs = setup
    conf = uf.UnlearnConfig(method="npo", irm="logit", irm_weight=0.5)
    g32, _ = ours_grads(model, forget, retain, envs, conf)
    g16, _ = ours_grads(copy.deepcopy(model).to(torch.bfloat16), forget, retain, envs, conf)
    assert all(g.dtype == torch.bfloat16 for g in g16)
    assert_rel_close([g.float() for g in g16], g32, 5e-2)


def test_npo_needs_ref_nll(setup):
    model, _, forget, retain, _ = setup
    batch = {k: v for k, v in forget.items() if k != "ref_nll"}
    with pytest.raises(ValueError, match="ref_nll"):
        uf.unlearning_gradients(model, batch, retain, (), uf.UnlearnConfig(method="npo"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="nope"), "method must be one of"),
        (dict(forget_weight=-1.0), "forget_weight must be a number >= 0"),
        (dict(irm="logit"), "irm_weight must be > 0"),
        (dict(irm_weight=1.0), "irm must name a reading"),
        (dict(irm="fancy", irm_weight=1.0), "irm must be one of"),
        (dict(sam_rho=0.01, gp_weight=0.1), "one forget-loss smoother"),
        (dict(sam_rho=-0.1), "sam_rho must be a number >= 0"),
        (dict(npo_form="token"), "npo_form"),
    ],
)
def test_bad_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        uf.UnlearnConfig(**kwargs)


def test_irm_without_env_batches_is_refused(setup):
    model, _, forget, retain, _ = setup
    with pytest.raises(ValueError, match="needs env_batches"):
        uf.unlearning_gradients(model, forget, retain, (), uf.UnlearnConfig(irm="logit", irm_weight=1.0))
    with pytest.raises(ValueError, match="needs a retain_batch"):
        uf.unlearning_gradients(model, forget, None, (), uf.UnlearnConfig(method="graddiff"))
