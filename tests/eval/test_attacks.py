import copy

import pytest
import torch

from unlearn_fast.testing.tiny import tiny_llama
from unlearn_fast.eval.attacks import (FinetuneSpec, RelearnSpec, finetune_attack, quantize_tensor, quantized_copy,
                                       relearn_attack, relearn_split)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("cols,group", [(64, 32), (50, 16), (7, 32)])
def test_quantization_error_bound(bits, cols, group):
    g = torch.Generator().manual_seed(bits + cols)
    w = torch.randn(9, cols, generator=g) * torch.logspace(-2, 1, 9).unsqueeze(1)  # rows of very different scale
    q, scale = quantize_tensor(w, bits, group)
    assert q.shape == w.shape and scale.shape == (9, -(-cols // group))
    # per group: |w − q(w)| <= scale / 2, and scale = absmax / (2^(b−1) − 1), computed here independently
    qmax = 2 ** (bits - 1) - 1
    for r in range(9):
        for k in range(scale.shape[1]):
            block = w[r, k * group:(k + 1) * group]
            s = block.abs().max() / qmax
            assert scale[r, k] == pytest.approx(float(s), rel=1e-6)
            err = (block - q[r, k * group:(k + 1) * group]).abs().max()
            assert err <= s / 2 * (1 + 1e-5) + 1e-12
            levels = torch.round(q[r, k * group:(k + 1) * group] / s)
            assert levels.abs().max() <= qmax and len(levels.unique()) <= 2 * qmax + 1


def test_eight_bit_is_closer_than_four_bit_and_zero_groups_stay_zero():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    w[3, :32] = 0
    e8 = (w - quantize_tensor(w, 8)[0]).abs().mean()
    e4 = (w - quantize_tensor(w, 4)[0]).abs().mean()
    assert e8 < e4 / 4
    assert (quantize_tensor(w, 4)[0][3, :32] == 0).all()
    with pytest.raises(ValueError, match="bits"):
        quantize_tensor(w, 1)
    with pytest.raises(ValueError, match="2-D"):
        quantize_tensor(w[0], 8)


def test_quantized_copy_leaves_the_model_alone():
    model = tiny_llama(layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clone = quantized_copy(model, 4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    changed = [k for k, v in clone.state_dict().items() if v.dim() == 2 and not torch.equal(v, before[k])]
    assert changed


def test_relearn_split_is_disjoint_and_seeded():
    a, b = relearn_split(30, 10, seed=1)
    assert len(a) == 10 and len(b) == 20 and not set(a) & set(b)
    assert relearn_split(30, 10, seed=1) == (a, b)
    with pytest.raises(ValueError, match="samples"):
        relearn_split(5, 5, seed=0)


# ---- attacks on a tiny model taught a tiny corpus, then plainly unlearned with gradient ascent
@pytest.fixture(scope="module")
def taught():
    from unlearn_fast.data.corpus import build_corpus
    from unlearn_fast.recipes.teach import ModelSpec, TeachSpec, build_model, teach
    from unlearn_fast.recipes.run import Data
    from unlearn_fast.data.tokenizer import WordTokenizer

    corpus = build_corpus(0, num_entities=16, forget_entities=6, general=20, utility=5, env_train=40, env_test=16)
    tok = WordTokenizer.from_texts(corpus.all_texts())
    model = build_model(ModelSpec(), len(tok), seed=0)  # the default model's shape (a smaller one hardly relearns)
    info = teach(model, tok, corpus, TeachSpec(lr=3e-3, batch_size=32, text_per_batch=4, env_per_batch=0,
                                               max_steps=300, min_steps=20, eval_every=10, target=1.0),
                 progress=lambda m: None)
    assert info["forget_acc"] >= 0.9
    return model, Data(corpus, tok)


def test_relearning_brings_back_what_gradient_ascent_hid(taught):
    from unlearn_fast.eval.metrics import answer_accuracy
    from unlearn_fast.recipes.run import UnlearnSpec, unlearn

    model, data = taught
    ga = copy.deepcopy(model)
    for chunk in range(12):  # plain gradient ascent, 5 steps at a time, until at most a quarter is answered
        unlearn(ga, data, "ga", UnlearnSpec(steps=5, batch_size=16, ga_lr=2e-4), seed=chunk)
        if answer_accuracy(ga, data.forget_probe)["acc"] <= 0.25:
            break
    assert answer_accuracy(ga, data.forget_probe)["acc"] <= 0.25
    before = {k: v.clone() for k, v in ga.state_dict().items()}
    spec = RelearnSpec(samples=8, steps=10, lr=1e-3, batch_size=4, eval_every=5)
    # questions never shown to the attacker come back: the mean gain over five attack seeds (each its own
    # split of shown / scored questions), not one seed's trajectory, which another CPU's rounding can flip.
    # Measured on a Sapphire Rapids CPU, 1 and 2 threads alike: gains 0.31, 0.38, 0.25, 0.50, 0.19 (mean 0.325);
    # the margin is under half of that.
    gains = []
    for seed in range(5):
        result = relearn_attack(ga, data.forget_train, data.forget_probe, spec, seed=seed)
        assert result["scored"] == len(data.forget_train) - 8
        gains.append(result["forget_acc"] - result["curve"][0][1])
    assert sum(gains) / len(gains) >= 0.15, gains
    for k, v in ga.state_dict().items():  # the attack works on a copy
        assert torch.equal(v, before[k])


def test_finetune_attack_learns_the_task_and_reports_quartiles(taught):
    model, data = taught
    spec = FinetuneSpec(steps=12, lr=1e-2, batch_size=8, eval_every=4)
    result = finetune_attack(model, data.env_train["sentiment"], data.env_test["sentiment"], data.forget_probe,
                             spec, seed=0)
    assert sorted(result["checkpoints"]) == [3, 6, 12]
    assert result["forget_acc"] == pytest.approx(sum(result["checkpoints"].values()) / 3)
    assert result["task_acc"] >= result["task_acc_before"] + 0.2
    assert 0.0 <= result["forget_prob"] <= 1.0


def test_relearning_reports_the_answer_probability_before_and_after_the_attack(taught):
    """The continuous figure beside exact match: the scored questions' mean answer probability of the model
    before the attack and of a copy fine-tuned the same way by hand after it."""
    from unlearn_fast.eval.attacks import finetune
    from unlearn_fast.eval.metrics import answer_accuracy

    model, data = taught
    spec = RelearnSpec(samples=6, steps=3, eval_every=3, batch_size=2, lr=1e-3)
    result = relearn_attack(model, data.forget_train, data.forget_probe, spec, seed=3, pad_token_id=data.pad)
    shown, scored = relearn_split(len(data.forget_train), 6, 3)
    probe = [data.forget_probe[i] for i in scored]
    assert result["prob_curve"][0] == [0, pytest.approx(answer_accuracy(model, probe, pad_token_id=data.pad)["prob"])]
    by_hand = finetune(copy.deepcopy(model), [data.forget_train[i] for i in shown], steps=3, lr=1e-3, batch_size=2,
                       seed=3, pad_token_id=data.pad)
    assert result["forget_prob"] == pytest.approx(answer_accuracy(by_hand, probe, pad_token_id=data.pad)["prob"])
    assert [s for s, _ in result["prob_curve"]] == [0, 3]


def test_relearning_over_draws_is_the_mean_of_the_single_draws(taught):
    """Each draw d is relearn_attack at seed + 1000·d (its own shown samples); the figures are their means."""
    from unlearn_fast.eval.attacks import relearn_over_draws

    model, data = taught
    spec = RelearnSpec(samples=6, steps=2, eval_every=1, batch_size=2, draws=3)
    single = [relearn_attack(model, data.forget_train, data.forget_probe, spec, seed=7 + 1000 * d,
                             pad_token_id=data.pad) for d in range(3)]
    got = relearn_over_draws(model, data.forget_train, data.forget_probe, spec, seed=7, pad_token_id=data.pad)
    assert got["forget_acc"] == pytest.approx(sum(r["forget_acc"] for r in single) / 3)
    assert got["gain"] == pytest.approx(sum(r["curve"][-1][1] - r["curve"][0][1] for r in single) / 3)
    assert got["forget_prob"] == pytest.approx(sum(r["forget_prob"] for r in single) / 3)
    assert got["prob_gain"] == pytest.approx(sum(r["prob_curve"][-1][1] - r["prob_curve"][0][1] for r in single) / 3)
    assert [s for s, _ in got["curve"]] == [0, 1, 2]
    for i, (_, acc) in enumerate(got["curve"]):
        assert acc == pytest.approx(sum(r["curve"][i][1] for r in single) / 3)
    assert [r["curve"] for r in got["draws"]] == [r["curve"] for r in single]
    with pytest.raises(ValueError, match="draws"):
        relearn_over_draws(model, data.forget_train, data.forget_probe, RelearnSpec(draws=0))
