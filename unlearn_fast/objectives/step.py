"""One unlearning step's gradient: ``unlearning_gradients`` (SPEC §1).

Order of the terms (each runs its own forward and backward, so only one
term's graph is alive at a time):
  1. forget term c_f·ℓ_f, smoothed if asked (SAM, GP, RS or CR: the weights are
     moved and restored exactly inside this term);
  2. retain term c_r·ℓ_r at the unperturbed weights;
  3. the ILU penalty λ·Σ_e P_e at the unperturbed weights.
Gradients accumulate into ``.grad`` of the trainable parameters exactly as
``loss.backward()`` of the summed objective would.
"""
from __future__ import annotations

from torch import nn

from . import regularizers as reg
from .adversarial import attacked_forget_batch
from .config import UnlearnConfig
from .lm import check_batch, final_hidden, lm_parts, trainable_parameters
from .losses import adversarial_forget_loss, env_ce, forget_loss, irm_logit_penalty, retain_loss
from .rmu import RMUModel, rmu_forget_loss, rmu_retain_loss


def unlearning_gradients(
    model: nn.Module,
    forget_batch: dict,
    retain_batch: dict | None = None,
    env_batches=(),
    config: UnlearnConfig | None = None,
    *,
    ref_model: nn.Module | None = None,
    step: int = 0,
) -> dict:
    """Accumulate the gradient of the unlearning objective into ``.grad``; return its terms as floats.

    ``ref_model`` is only needed for ``retain_loss="kl"`` on a model without PEFT
    adapters; ``step`` varies the RS noise between steps.
    """
    config = config or UnlearnConfig()
    env_batches = list(env_batches)
    _check(model, forget_batch, retain_batch, env_batches, config)
    params = trainable_parameters(model)
    parts = lm_parts(model)
    c_f, c_r = config.forget_weight, config.retain_weight
    metrics: dict = {}

    if config.method == "rmu":
        rmu = _rmu_model(model, parts, config)
        forget_bottom = rmu.bottom(forget_batch)
        forget_fn = lambda: rmu_forget_loss(rmu, forget_bottom, forget_batch, config)  # noqa: E731
    elif config.adv_eps > 0:  # C-AdvUL: δ found once at θ; the forget loss (smoothed or not) is taken there
        attacked = attacked_forget_batch(model, forget_batch, config)
        forget_fn = lambda: adversarial_forget_loss(parts, attacked, config)  # noqa: E731
    else:
        forget_fn = lambda: forget_loss(parts, forget_batch, config)  # noqa: E731

    if config.sam_rho > 0:
        metrics.update(reg.sam_forget(params, forget_fn, c_f, config.sam_rho, config.sam_adaptive))
    elif config.gp_weight > 0:
        metrics.update(reg.gp_forget(params, forget_fn, c_f, config.gp_weight, config.gp_step))
    elif config.rs_samples > 0:
        metrics.update(reg.rs_forget(params, forget_fn, c_f, config.rs_samples, config.rs_sigma,
                                     seed=hash((config.seed, step))))
    elif config.cr_weight > 0:
        metrics.update(reg.cr_forget(params, forget_fn, c_f, config.cr_weight, config.cr_step, config.fd_step))
    else:
        loss, terms = forget_fn()
        (c_f * loss).backward()
        metrics.update(terms, forget_loss=float(loss.detach()))

    if retain_batch is not None and config.uses_retain:
        if config.method == "rmu":
            loss, terms = rmu_retain_loss(rmu, rmu.bottom(retain_batch), retain_batch, config)
        else:
            loss, terms = retain_loss(parts, retain_batch, config, reference=_reference(model, ref_model))
        (c_r * loss).backward()
        metrics.update(terms, retain_loss=float(loss.detach()))

    if config.irm in ("logit", "logit_unbiased"):
        penalty, terms = irm_logit_penalty(parts, env_batches, config)
        (config.irm_weight * penalty).backward()
        metrics.update(terms)
    elif config.irm is not None:
        fns = [lambda b=b: env_ce(parts, b, config) for b in env_batches]
        metrics.update(reg.param_irm(params, fns, config.irm_weight, config.irm, config.irm_fd_step))

    metrics["loss"] = (c_f * metrics["forget_loss"] + c_r * metrics.get("retain_loss", 0.0)
                       + config.irm_weight * metrics.get("irm_penalty", 0.0))
    return metrics


def _check(model, forget_batch, retain_batch, env_batches, config):
    if not isinstance(config, UnlearnConfig):
        raise TypeError(f"config must be an UnlearnConfig, got {type(config).__name__}")
    check_batch("forget_batch", forget_batch, need_labels=config.method != "rmu")
    if retain_batch is not None:
        check_batch("retain_batch", retain_batch, need_labels=config.method != "rmu")
    elif config.method == "graddiff" or (config.method == "rmu" and config.retain_weight > 0):
        raise ValueError(f"method={config.method!r} needs a retain_batch")
    for i, b in enumerate(env_batches):
        check_batch(f"env_batches[{i}]", b)
    if config.irm is not None and not env_batches:
        raise ValueError(f"UnlearnConfig.irm={config.irm!r} needs env_batches (one batch per environment)")
    if not trainable_parameters(model):
        raise ValueError("model has no trainable parameter (requires_grad=True)")


def _rmu_model(model, parts, config) -> RMUModel:
    """The RMU view of the model, made at the first call: its start weights are those of that call."""
    cache = model.__dict__.setdefault("_unlearn_fast_rmu", {})
    if config.rmu_layer not in cache:
        cache[config.rmu_layer] = RMUModel(parts, config.rmu_layer)
    return cache[config.rmu_layer]


def _reference(model, ref_model):
    """θ0's (parts, final hidden) for a batch: ``ref_model``, or the PEFT model with adapters disabled."""
    if ref_model is not None:
        ref_parts = lm_parts(ref_model)
        return lambda batch: (ref_parts, final_hidden(ref_parts, batch))
    if hasattr(model, "disable_adapter"):
        parts = lm_parts(model)

        def base(batch):
            with model.disable_adapter():
                return parts, final_hidden(parts, batch)

        return base
    return None
