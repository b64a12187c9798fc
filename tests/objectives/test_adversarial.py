"""uf.embedding_attack and C-AdvUL (SPEC §1.5) against the naive attack of tests/reference_adversarial.py."""
import pytest
import torch
import torch.nn.functional as F

import unlearn_fast as uf
from unlearn_fast.testing import reference_adversarial as ref
from unlearn_fast.testing.tiny import make_batch, tiny_llama
from unlearn_fast.objectives import adversarial
from unlearn_fast.ops import _torch_linear_ce


def ragged_batch(seed, vocab=97):
    """Prompts of different lengths (3, 5, 2), right padding on the last row."""
    batch = make_batch(seed, batch=3, length=11, vocab=vocab, prompt=2, pad_last=3)
    batch["labels"][0, :3] = -100
    batch["labels"][1, :5] = -100
    return batch


def batch_args(batch):
    return batch["input_ids"], batch["labels"]


@pytest.fixture(scope="module")
def model64():
    return tiny_llama(layers=2, dtype=torch.float64)


# Small eps: the projection binds after a few steps; large eps: it never binds (pure signed steps).
@pytest.mark.parametrize("eps,step_size", [(0.004, 1e-3), (1.0, 2e-3)])
def test_delta_matches_the_naive_attack(model64, eps, step_size):
    batch = ragged_batch(0)
    for steps in (1, 2, 4):
        ours = uf.embedding_attack(model64, *batch_args(batch), attention_mask=batch["attention_mask"], eps=eps,
                                   steps=steps, step_size=step_size)
        naive = ref.naive_attack(model64, *batch_args(batch), batch["attention_mask"], eps=eps, steps=steps,
                                 step_size=step_size)
        assert ours.dtype == torch.float64 and ours.shape == (3, 11, 32)
        assert naive.abs().max() > 0
        torch.testing.assert_close(ours, naive, rtol=1e-9, atol=1e-12)
    bound = ref.radius(model64, eps)
    norms = ours.norm(dim=-1)
    binding = bool((norms > bound * (1 - 1e-9)).any())
    assert binding == (eps < 0.1)  # each case exercises what it says


def test_universal_delta_matches_the_naive_attack(model64):
    batch = ragged_batch(1)
    ours = adversarial.universal_perturbation(model64, *batch_args(batch), attention_mask=batch["attention_mask"],
                                              eps=0.01, steps=3, step_size=1e-3)
    naive = ref.naive_universal(model64, *batch_args(batch), batch["attention_mask"], eps=0.01, steps=3,
                                step_size=1e-3)
    assert ours.shape == (5, 32)  # the longest prompt before an answer
    torch.testing.assert_close(ours, naive, rtol=1e-9, atol=1e-12)
    placed = uf.embedding_attack(model64, *batch_args(batch), attention_mask=batch["attention_mask"], eps=0.01,
                                 steps=3, step_size=1e-3, universal=True)
    torch.testing.assert_close(placed, ref.naive_place(naive, batch["labels"], batch["attention_mask"]),
                               rtol=1e-9, atol=1e-12)


def test_universal_slots_count_back_from_the_answer():
    labels = torch.tensor([[-100, -100, -100, 5, 6, -100],
                           [-100, 7, 8, -100, -100, -100],
                           [-100, -100, -100, -100, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    expected = torch.tensor([[2, 1, 0, -1, -1, -1],
                             [0, -1, -1, -1, -1, -1],  # unlabelled tokens after the answer are not in the prompt
                             [3, 2, 1, 0, -1, -1]])  # no answer: counted back from the end
    assert torch.equal(adversarial.universal_slots(labels, mask), expected)
    delta = torch.arange(1, 4, dtype=torch.float32).unsqueeze(1).expand(3, 2)  # slot k holds k + 1
    placed = adversarial.place_universal(delta, labels, mask)
    assert placed[0, :, 0].tolist() == [3, 2, 1, 0, 0, 0]
    assert placed[2, :, 0].tolist() == [0, 3, 2, 1, 0, 0]  # slot 3 is beyond δ: zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bound_and_support_hold_after_every_step(dtype):
    model = tiny_llama(layers=1, dtype=dtype)
    batch = ragged_batch(2)
    bound = adversarial.embedding_radius(model, 0.02)
    prompt = (batch["labels"] == -100) & batch["attention_mask"].bool()
    for steps in range(1, 5):
        delta = uf.embedding_attack(model, *batch_args(batch), attention_mask=batch["attention_mask"], eps=0.02,
                                    steps=steps, step_size=3e-3)
        assert delta.dtype == dtype
        norms = delta.float().norm(dim=-1)
        slack = 1e-5 if dtype == torch.float32 else 1e-2  # the cast of the fp32 δ to bf16
        assert (norms <= bound * (1 + slack)).all(), (float(norms.max()), bound)
        assert (norms[prompt] > 0).all()  # every prompt token is attacked
        assert (delta[~prompt] == 0).all()  # answers and padding never are
    assert norms.max() > bound * 0.99  # the projection was active


def test_zero_steps_give_zero_and_eps_zero_gives_zero():
    model = tiny_llama(layers=1)
    batch = ragged_batch(3)
    assert (uf.embedding_attack(model, *batch_args(batch), steps=0) == 0).all()
    assert (uf.embedding_attack(model, *batch_args(batch), eps=0.0, steps=3, step_size=1e-2) == 0).all()


def test_attack_lowers_the_answer_loss():
    model = tiny_llama(layers=2)
    batch = ragged_batch(4)
    delta = uf.embedding_attack(model, *batch_args(batch), attention_mask=batch["attention_mask"], eps=0.5,
                                steps=10, step_size=1e-2)
    clean = model.get_input_embeddings()(batch["input_ids"]).detach()
    with torch.no_grad():
        before = ref.answer_ce(model, clean, batch["attention_mask"], batch["labels"])
        after = ref.answer_ce(model, clean + delta, batch["attention_mask"], batch["labels"])
    assert after < before - 0.05, (float(before), float(after))


def test_parameters_their_gradients_and_flags_are_untouched():
    model = tiny_llama(layers=2)
    params = list(model.parameters())
    for i, p in enumerate(params):
        if i % 3 == 0:
            p.requires_grad_(False)
        elif i % 3 == 1:
            p.grad = torch.randn_like(p)
    before = [(p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone()) for p in params]
    batch = ragged_batch(5)
    for universal in (False, True):
        uf.embedding_attack(model, *batch_args(batch), attention_mask=batch["attention_mask"], eps=0.1, steps=3,
                            step_size=1e-2, universal=universal)
    for p, (value, flag, grad) in zip(params, before):
        assert torch.equal(p.detach(), value) and p.requires_grad == flag
        assert (p.grad is None) == (grad is None)
        if grad is not None:
            assert torch.equal(p.grad, grad)


def test_the_fused_head_forms_no_weight_gradient_during_the_attack(monkeypatch):
    calls = []
    real = _torch_linear_ce.chunked_pass

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        if kwargs.get("coeffs") is not None:
            calls.append((kwargs.get("weight_grad", True), out[1][1]))
        return out

    monkeypatch.setattr(_torch_linear_ce, "chunked_pass", spy)
    model = tiny_llama(layers=1)
    batch = ragged_batch(6)
    uf.embedding_attack(model, *batch_args(batch), eps=0.1, steps=2, step_size=1e-2)
    assert len(calls) == 2 and all(flag is False and d_w is None for flag, d_w in calls)


def test_frozen_head_input_gradient_equals_the_full_one():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 7, dtype=torch.float64, generator=g)
    w = torch.randn(23, 7, dtype=torch.float64, generator=g)
    y = torch.randint(0, 23, (13,), generator=g)
    y[3] = -100
    h1 = h.clone().requires_grad_()
    uf.ops.linear_cross_entropy(h1, w, y).backward()  # frozen weight
    h2 = h.clone().requires_grad_()
    F.cross_entropy(h2 @ w.T, y, ignore_index=-100).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kwargs,name", [
    (dict(eps=-0.1), "eps"), (dict(steps=-1), "steps"), (dict(steps=1.5), "steps"), (dict(step_size=-1.0), "step_size"),
])
def test_bad_arguments_name_themselves(kwargs, name):
    model = tiny_llama(layers=1)
    batch = ragged_batch(7)
    with pytest.raises(ValueError, match=name):
        uf.embedding_attack(model, *batch_args(batch), **kwargs)


def test_shapes_that_disagree_are_refused():
    model = tiny_llama(layers=1)
    batch = ragged_batch(8)
    with pytest.raises(ValueError, match="labels"):
        uf.embedding_attack(model, batch["input_ids"], batch["labels"][:, :-1])
    with pytest.raises(ValueError, match="attention_mask"):
        uf.embedding_attack(model, *batch_args(batch), attention_mask=batch["attention_mask"][:2])
    with pytest.raises(ValueError, match="input_ids"):
        uf.embedding_attack(model, batch["input_ids"][0], batch["labels"][0])


# ---- the training method
@pytest.mark.parametrize("kwargs,match", [
    (dict(adv_eps=-1.0), "adv_eps"), (dict(adv_steps=-2), "adv_steps"), (dict(adv_step_size=-1e-4), "adv_step_size"),
    (dict(adv_cutoffs=(0.5,)), "adv_cutoffs"), (dict(adv_away_weight=-0.5), "adv_away_weight"),
    (dict(method="rmu", adv_eps=0.05), "adv_eps"),
])
def test_config_validates_the_adversarial_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        uf.UnlearnConfig(**kwargs)


def test_config_defaults_and_yaml_lists():
    config = uf.UnlearnConfig(adv_eps=0.05, adv_cutoffs=[1, -3])
    assert config.adv_cutoffs == (1.0, -3.0) and config.adv_steps == 10 and config.adv_step_size == 1e-4
    assert (config.adv_toward_weight, config.adv_away_weight) == (0.5, 0.5)
    assert not config.backward_only and uf.UnlearnConfig().backward_only


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def test_graddiff_step_takes_the_forget_loss_at_the_attacked_embeddings(model64):
    forget, retain = ragged_batch(9), make_batch(10)
    config = uf.UnlearnConfig(method="graddiff", adv_eps=0.02, adv_steps=3, adv_step_size=1e-3)
    for p in model64.parameters():
        p.requires_grad_(True)
    model64.zero_grad(set_to_none=True)
    metrics = uf.unlearning_gradients(model64, forget, retain, config=config)
    ours = _grads(model64)
    model64.zero_grad(set_to_none=True)
    delta = ref.naive_attack(model64, *batch_args(forget), forget["attention_mask"], eps=0.02, steps=3,
                             step_size=1e-3)
    for p in model64.parameters():
        p.requires_grad_(True)
    embed = model64.get_input_embeddings()
    forget_ce = ref.answer_ce(model64, embed(forget["input_ids"]) + delta, forget["attention_mask"], forget["labels"])
    retain_ce = ref.answer_ce(model64, embed(retain["input_ids"]), retain["attention_mask"], retain["labels"])
    naive = torch.autograd.grad(-forget_ce + retain_ce, list(model64.parameters()))
    for a, b in zip(ours, naive):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
    assert metrics["forget_ce"] == pytest.approx(float(forget_ce.detach()), rel=1e-9)
    clean_ce = ref.answer_ce(model64, embed(forget["input_ids"]), forget["attention_mask"], forget["labels"])
    assert float(forget_ce.detach()) < float(clean_ce.detach())  # the attack did pull toward the answer
    model64.zero_grad(set_to_none=True)


def test_cadvul_terms_with_a_target_answer(model64):
    forget = ragged_batch(11)
    target_ids = forget["input_ids"].clone()
    answer = forget["labels"] != -100
    target_ids[answer] = 4  # the same prompts, a constant "refusal" answer
    forget.update(target_input_ids=target_ids, target_labels=torch.where(answer, 4, -100),
                  target_attention_mask=forget["attention_mask"])
    config = uf.UnlearnConfig(method="ga", adv_eps=0.02, adv_steps=2, adv_step_size=1e-3, adv_toward_weight=0.3,
                              adv_away_weight=0.7, adv_cutoffs=(0.5, -5.0))
    for p in model64.parameters():
        p.requires_grad_(True)
    model64.zero_grad(set_to_none=True)
    metrics = uf.unlearning_gradients(model64, forget, None, config=config)
    ours = _grads(model64)
    model64.zero_grad(set_to_none=True)
    delta = ref.naive_attack(model64, *batch_args(forget), forget["attention_mask"], eps=0.02, steps=2,
                             step_size=1e-3)
    for p in model64.parameters():
        p.requires_grad_(True)
    embed = model64.get_input_embeddings()
    away = -ref.answer_ce(model64, embed(forget["input_ids"]) + delta, forget["attention_mask"], forget["labels"])
    toward = ref.answer_ce(model64, embed(target_ids) + delta, forget["attention_mask"], forget["target_labels"])
    loss = 0.7 * torch.clamp(away, min=-5.0) + 0.3 * torch.clamp(toward, min=0.5)
    naive = torch.autograd.grad(loss, list(model64.parameters()), retain_graph=True)
    for a, b in zip(ours, naive):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
    assert metrics["forget_loss"] == pytest.approx(float(loss.detach()), rel=1e-9)
    assert metrics["toward_ce"] == pytest.approx(float(toward.detach()), rel=1e-9)
    # below the cut-off the term gives no gradient: with a toward cut-off above its CE only away is left
    high = uf.UnlearnConfig(method="ga", adv_eps=0.02, adv_steps=2, adv_step_size=1e-3, adv_toward_weight=0.3,
                            adv_away_weight=0.7, adv_cutoffs=(float(toward.detach()) + 1.0, -5.0))
    uf.unlearning_gradients(model64, forget, None, config=high)
    only_away = torch.autograd.grad(0.7 * away, list(model64.parameters()))
    for p, b in zip(model64.parameters(), only_away):
        torch.testing.assert_close(p.grad, b, rtol=1e-8, atol=1e-11)
    model64.zero_grad(set_to_none=True)


def test_a_target_with_another_prompt_is_refused():
    model = tiny_llama(layers=1)
    forget = ragged_batch(12)
    other = forget["input_ids"].clone()
    other[0, 0] = (other[0, 0] + 1) % 97
    forget.update(target_input_ids=other, target_labels=forget["labels"].clone())
    with pytest.raises(ValueError, match="target_input_ids"):
        uf.unlearning_gradients(model, forget, None, config=uf.UnlearnConfig(method="ga", adv_eps=0.05))


@pytest.mark.parametrize("kwargs", [dict(method="npo"), dict(method="simnpo"), dict(method="npo", sam_rho=0.01),
                                    dict(method="ga", gp_weight=0.1)])
def test_every_forget_loss_and_smoother_runs_at_the_naive_attacked_embeddings(model64, kwargs):
    """npo+adv, npo+sam+adv, ...: the step with adv_eps equals the plain step on the batch carrying the naive δ."""
    forget, retain = ragged_batch(13), make_batch(14)
    forget["ref_nll"] = torch.tensor([20.0, 25.0, 15.0], dtype=torch.float64)
    for p in model64.parameters():
        p.requires_grad_(True)
    delta = ref.naive_attack(model64, *batch_args(forget), forget["attention_mask"], eps=0.02, steps=3,
                             step_size=1e-3)
    for p in model64.parameters():
        p.requires_grad_(True)
    model64.zero_grad(set_to_none=True)
    uf.unlearning_gradients(model64, dict(forget, embedding_delta=delta), retain, config=uf.UnlearnConfig(**kwargs))
    expected = _grads(model64)
    model64.zero_grad(set_to_none=True)
    clean = uf.unlearning_gradients(model64, forget, retain, config=uf.UnlearnConfig(**kwargs))
    clean_grads = _grads(model64)
    model64.zero_grad(set_to_none=True)
    adv = uf.unlearning_gradients(model64, forget, retain, config=uf.UnlearnConfig(
        adv_eps=0.02, adv_steps=3, adv_step_size=1e-3, **kwargs))
    for p, b in zip(model64.parameters(), expected):
        torch.testing.assert_close(p.grad, b, rtol=1e-8, atol=1e-11)
    assert adv["forget_loss"] != pytest.approx(clean["forget_loss"], rel=1e-6)  # the attack changed the point
    assert any(not torch.allclose(a, b, rtol=1e-6) for a, b in zip(expected, clean_grads))
    model64.zero_grad(set_to_none=True)
