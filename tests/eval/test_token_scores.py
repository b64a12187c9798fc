"""Logits-free per-token scores against materialised logits; a model with known probabilities."""
import math

import pytest
import torch

from unlearn_fast.testing.benchmarks import KnownLM, naive_token_stats
from unlearn_fast.testing.tiny import tiny_llama
from unlearn_fast.eval import token_scores as ts
from unlearn_fast.eval.token_scores import average_losses, summed_logprobs, token_scores


def ex(ids, labels):
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


def test_known_probabilities_give_exact_scores():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25],
                          [0.1, 0.2, 0.3, 0.4],
                          [0.7, 0.1, 0.1, 0.1],
                          [0.5, 0.5, 1e-9, 1e-9]])
    probs = probs / probs.sum(1, keepdim=True)
    model = KnownLM(probs)
    examples = [ex([1, 2, 0], [-100, 2, 0]), ex([3, 1], [-100, 1]), ex([0, 3, 0, 1], [-100, -100, 0, 1])]
    out = token_scores(model, examples, batch_size=2, moments=True)
    expected = [[probs[1, 2], probs[2, 0]], [probs[3, 1]], [probs[3, 0], probs[0, 1]]]
    for s, e in zip(out, expected):
        assert torch.allclose(s.logp.double(), torch.tensor(e, dtype=torch.float64).log(), atol=1e-6)
    # E_p[log p] and Var_p[log p] of row 1: the distribution (0.1, 0.2, 0.3, 0.4)
    row = probs[1].double()
    mu = float((row * row.log()).sum())
    var = float((row * row.log().square()).sum()) - mu ** 2
    assert float(out[1].mu) == pytest.approx(float((probs[3] * probs[3].log()).sum()), abs=1e-5)
    assert float(out[0].mu[0]) == pytest.approx(mu, abs=1e-6)
    assert float(out[0].var[0]) == pytest.approx(var, abs=1e-5)
    assert float(out[0].var[1]) == pytest.approx(float(0.7 * math.log(0.7) ** 2 + 0.3 * math.log(0.1) ** 2
                                                       - (0.7 * math.log(0.7) + 0.3 * math.log(0.1)) ** 2), abs=1e-5)
    assert average_losses(out)[1] == pytest.approx(-math.log(float(probs[3, 1])), abs=1e-6)
    assert summed_logprobs(out)[0] == pytest.approx(math.log(float(probs[1, 2] * probs[2, 0])), abs=1e-6)


@pytest.mark.parametrize("workspace", [None, 97 * 3])  # the default, and 3-row chunks of the moments pass
def test_token_scores_match_materialised_logits(monkeypatch, workspace):
    if workspace:
        monkeypatch.setattr(ts, "MOMENT_WORKSPACE", workspace)
    model = tiny_llama(layers=2, seed=1).eval()
    g = torch.Generator().manual_seed(0)
    examples = []
    for length, prompt in [(9, 3), (5, 1), (12, 6), (7, 2), (4, 3)]:
        ids = torch.randint(4, 97, (length,), generator=g)
        labels = ids.clone()
        labels[:prompt] = -100
        examples.append({"input_ids": ids, "labels": labels})
    out = token_scores(model, examples, batch_size=2, moments=True)  # sorted by length, padded per batch
    for s, e in zip(out, examples):
        lp, mu, var = naive_token_stats(model, e)
        assert s.logp.shape == lp.shape
        assert torch.allclose(s.logp.double(), lp, atol=2e-5)
        assert torch.allclose(s.mu.double(), mu, atol=2e-5)
        assert torch.allclose(s.var.double(), var, atol=5e-5)


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        token_scores(tiny_llama(layers=1), [], batch_size=0)
