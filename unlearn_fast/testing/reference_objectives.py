"""Naive reference implementations of the unlearning objectives, the way the public code computes them.

Full logits from ``model(**batch).logits``, a reference-model copy for NPO and
KL, the IRM penalty by double backprop, SAM with cloned parameters. The tests
compare ``uf.unlearning_gradients`` against these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_ce(logits, labels, reduction="none"):
    logits, labels = logits[:, :-1], labels[:, 1:]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 CE, fp64 kept for fp64 models
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction=reduction)


def sequence_nll(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    ce = token_ce(out.logits, batch["labels"]).view(batch["input_ids"].shape[0], -1)
    return ce.sum(1), (batch["labels"][:, 1:] != -100).sum(1)


def mean_ce(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return token_ce(out.logits, batch["labels"], reduction="mean")


def naive_forget_loss(model, batch, conf, ref_model=None):
    if conf.method in ("ga", "graddiff"):
        return -mean_ce(model, batch)
    nll, count = sequence_nll(model, batch)
    if conf.method == "simnpo":
        return -(2 / conf.beta) * F.logsigmoid(conf.beta * (nll / count - conf.simnpo_delta)).mean()
    with torch.no_grad():  # the reference code runs the reference model every step
        ref_nll, _ = sequence_nll(ref_model, batch)
    if conf.npo_form == "batch_mean":
        delta = (nll.sum() - ref_nll.sum()) / count.sum()
        return -(2 / conf.beta) * F.logsigmoid(conf.beta * delta)
    return -(2 / conf.beta) * F.logsigmoid(conf.beta * (nll - ref_nll)).mean()


def naive_retain_loss(model, batch, conf, ref_model=None):
    if conf.retain_loss == "ce":
        return mean_ce(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    with torch.no_grad():
        ref = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    keep = batch["labels"][:, 1:] != -100
    kl = F.kl_div(F.log_softmax(logits[keep], -1), F.log_softmax(ref[keep], -1), log_target=True, reduction="sum")
    return kl / keep.sum()


def naive_irm_penalty(model, env_batches):
    """Σ_e (d CE_e(w · logits)/dw at w = 1)², by create_graph autograd (double backprop)."""
    penalty = 0.0
    for batch in env_batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        w = torch.ones((), requires_grad=True)
        loss = token_ce(logits * w, batch["labels"], reduction="mean")
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        penalty = penalty + g * g
    return penalty


def naive_sam_gradients(model, forget_fn, rho, adaptive=False, loss_fn=None):
    """Cloned-parameter SAM: returns ∇ℓ_f at θ + ρ g/‖g‖ as a list, restoring θ from the clones.

    ``loss_fn``: take the gradient of this loss at the perturbed point instead of ℓ_f's.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(forget_fn(), params)
    clones = [p.detach().clone() for p in params]
    with torch.no_grad():
        if adaptive:
            norm = torch.sqrt(sum(((p.abs() * g) ** 2).sum() for p, g in zip(params, grads)))
            for p, g in zip(params, grads):
                p.add_(rho * p.abs() ** 2 * g / norm)
        else:
            norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
            for p, g in zip(params, grads):
                p.add_(rho * g / norm)
    perturbed = torch.autograd.grad((loss_fn or forget_fn)(), params)
    with torch.no_grad():
        for p, c in zip(params, clones):
            p.copy_(c)
    return list(perturbed)


def layer_output(model, batch, layer):
    """Output of decoder layer ``layer`` from a FULL forward (the reference RMU code's forward_with_cache)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return out.hidden_states[layer + 1]


def naive_rmu_loss(model, frozen, forget, retain, conf, u):
    """mean ‖h_f − c u‖² + α mean ‖h_r − h_r(θ0)‖² over non-padding tokens (all positions if reference)."""

    def mean_sq(diff, mask):
        sq = diff.float() ** 2
        if conf.compat == "reference":
            return sq.mean()
        m = mask.unsqueeze(-1).float()
        return (sq * m).sum() / (m.sum() * sq.shape[-1])

    act_f = layer_output(model, forget, conf.rmu_layer)
    act_r = layer_output(model, retain, conf.rmu_layer)
    with torch.no_grad():
        act_r0 = layer_output(frozen, retain, conf.rmu_layer)
    return (mean_sq(act_f - conf.rmu_steering * u, forget["attention_mask"])
            + conf.rmu_alpha * mean_sq(act_r - act_r0, retain["attention_mask"]))


def unbiased_halves_of(batch):
    """Half (0 = A, 1 = B) of each row: rows alternate by rank among the rows that have a non-ignored label."""
    has_tokens = (batch["labels"][:, 1:] != -100).any(1)
    rank = has_tokens.long().cumsum(0) - 1
    return rank % 2, has_tokens


def naive_irm_unbiased_penalty(model, env_batches):
    """Σ_e s_e^A · s_e^B, s_e^X = d CE_X(w_X · logits)/dw_X at w_X = 1 over half X's tokens, by double backprop."""
    penalty = 0.0
    for batch in env_batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        half, has_tokens = unbiased_halves_of(batch)
        scales = []
        for which in (0, 1):
            rows = (half == which) & has_tokens
            w = torch.ones((), requires_grad=True)
            loss = token_ce(logits[rows] * w, batch["labels"][rows], reduction="mean")
            (s,) = torch.autograd.grad(loss, w, create_graph=True)
            scales.append(s)
        penalty = penalty + scales[0] * scales[1]
    return penalty


def model_at(model, params):
    """The model as a function with its trainable parameters replaced by ``params`` (a list, autograd-connected)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    mapping = dict(zip(names, params))
    return lambda **kw: torch.func.functional_call(model, mapping, args=(), kwargs=kw)


def naive_param_irm_penalty(model, params, env_batches, reading):
    """Σ_e ‖∇_w ℓ_e(w ∘ θ)|_{w=1}‖², w a scalar (param_scalar) or one weight per entry (param_elementwise),
    straight from the definition with double backprop (create_graph)."""
    penalty = 0.0
    for batch in env_batches:
        if reading == "param_scalar":
            ws = [torch.ones((), dtype=params[0].dtype, requires_grad=True)]
            scaled = [ws[0] * p for p in params]
        else:
            ws = [torch.ones_like(p, requires_grad=True) for p in params]
            scaled = [w * p for w, p in zip(ws, params)]
        loss = mean_ce(model_at(model, scaled), batch)
        grads = torch.autograd.grad(loss, ws, create_graph=True)
        penalty = penalty + sum((g * g).sum() for g in grads)
    return penalty


def naive_cr_regulariser(model, params, forget_loss_at, h):
    """‖∇ℓ(θ + h z) − ∇ℓ(θ)‖ with z = ∇ℓ(θ)/‖∇ℓ(θ)‖ held constant, differentiable in θ (double backprop)."""
    g0 = torch.autograd.grad(forget_loss_at(params), params, create_graph=True)
    norm = torch.sqrt(sum((g.detach() ** 2).sum() for g in g0))
    moved = [p + h * g.detach() / norm for p, g in zip(params, g0)]
    g1 = torch.autograd.grad(forget_loss_at(moved), moved, create_graph=True)
    return torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(g1, g0)))


def naive_grad_norm(params, forget_loss_at):
    """‖∇ℓ(θ)‖, differentiable in θ (double backprop): GP's penalty."""
    g = torch.autograd.grad(forget_loss_at(params), params, create_graph=True)
    return torch.sqrt(sum((x ** 2).sum() for x in g))
