"""RMU: the truncated forward equals the full-forward RMU of the reference code, and its gradient matches."""
import copy

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.testing import reference_objectives as ref
from unlearn_fast.testing.tiny import make_batch, tiny_llama


@pytest.mark.parametrize("compat", ["default", "reference"])
def test_rmu_gradient_matches_full_forward_reference(compat):
    model = tiny_llama(layers=5, seed=7)
    names = uf.rmu_trainable(model, layer=3, span=2)
    assert names == ["layers.2.mlp.down_proj.weight", "layers.3.mlp.down_proj.weight"]
    frozen = copy.deepcopy(model)
    conf = uf.UnlearnConfig(method="rmu", rmu_layer=3, rmu_steering=2.0, rmu_alpha=10.0, compat=compat)
    forget, retain = make_batch(1), make_batch(2)
    params = [p for p in model.parameters() if p.requires_grad]
    u = uf.objectives.rmu.steering_vector(32, conf.seed, "cpu", torch.float32)
    assert torch.all(u >= 0) and abs(float(u.norm()) - 1) < 1e-6

    for step in range(2):  # the second step runs at moved weights: θ0 must come from the snapshot
        model.zero_grad(set_to_none=True)
        metrics = uf.unlearning_gradients(model, forget, retain, (), conf)
        ours = [p.grad.clone() for p in params]
        loss = ref.naive_rmu_loss(model, frozen, forget, retain, conf, u)
        naive = torch.autograd.grad(loss, params)
        assert metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-4)
        for a, b in zip(ours, naive):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        with torch.no_grad():
            for p in params:
                p.sub_(0.5 * p.grad)


def test_rmu_runs_no_layer_above_L():
    model = tiny_llama(layers=5, seed=8)
    uf.rmu_trainable(model, layer=2, span=1)
    calls = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
             for i, layer in enumerate(model.model.layers)]
    conf = uf.UnlearnConfig(method="rmu", rmu_layer=2)
    uf.unlearning_gradients(model, make_batch(1), make_batch(2), (), conf)
    for h in hooks:
        h.remove()
    assert max(calls) == 2
    # layers 0, 1 run once per batch (2 batches); layer 2 runs for forget, retain, and retain at θ0
    assert calls.count(0) == 2 and calls.count(1) == 2 and calls.count(2) == 3
