import math

import pytest
import torch
from torch import nn
from types import SimpleNamespace

from unlearn_fast.testing.tiny import tiny_llama
from unlearn_fast.eval.metrics import (answer_accuracy, answer_scores, greedy_generate, lcs_length, perplexity,
                                       rouge_l, verbmem)


class Bigram(nn.Module):
    """A model whose next-token logits depend on the current token only: logits[t] = table[ids[t]]."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.as_tensor(table, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.table[input_ids])


def _peaked(vocab, pairs, high=2.0):
    table = torch.zeros(vocab, vocab)
    for a, b in pairs:
        table[a, b] = high
    return table


def ex(ids, labels):
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


def test_accuracy_and_probability_hand_made():
    model = Bigram(_peaked(6, [(1, 2), (2, 3), (3, 4)]))
    p_hit = math.exp(2) / (math.exp(2) + 5)  # the peaked token
    p_miss = 1 / (math.exp(2) + 5)
    examples = [ex([1, 2, 3], [-100, 2, 3]),  # both answer tokens are the arg-max: known
                ex([1, 2, 5], [-100, -100, 5]),  # 2 -> 3 is greedy, not 5: unknown
                ex([4, 1, 2, 3, 4], [-100, -100, 2, 3, 4])]  # padded in a batch with shorter ones
    scores = answer_scores(model, examples, batch_size=2)
    assert scores["correct"] == [True, False, True]
    assert scores["prob"][0] == pytest.approx(p_hit)
    assert scores["prob"][1] == pytest.approx(p_miss)
    res = answer_accuracy(model, examples)
    assert res["acc"] == pytest.approx(2 / 3)
    assert res["prob"] == pytest.approx((2 * p_hit + p_miss) / 3)


def test_perplexity_hand_made():
    assert perplexity(Bigram(torch.zeros(7, 7)), [ex([1, 2, 3, 4], [1, 2, 3, 4])]) == pytest.approx(7.0)
    model = Bigram(_peaked(5, [(1, 2), (2, 3)], high=1.0))
    # 1->2 and 2->3 are the peaked tokens (p = e/(e+4)); row 3 is flat, so 3->0 has p = 1/5
    nll = 2 * -math.log(math.e / (math.e + 4)) + math.log(5)
    assert perplexity(model, [ex([1, 2, 3, 0], [-100, 2, 3, 0])]) == pytest.approx(math.exp(nll / 3))
    with pytest.raises(ValueError):
        perplexity(model, [ex([1, 2], [-100, -100])])


def test_teacher_forced_match_equals_greedy_decoding():
    model = tiny_llama(layers=2, seed=1).eval()
    g = torch.Generator().manual_seed(0)
    examples, expected = [], []
    for i in range(12):
        prompt = torch.randint(1, 97, (4,), generator=g).tolist()
        greedy = greedy_generate(model, prompt, 3)
        answer = list(greedy)
        if i % 2:  # half of them: change one answer token, so the greedy output no longer matches
            answer[i % 3] = (answer[i % 3] + 1) % 97
        examples.append(ex(prompt + answer, [-100] * 4 + answer))
        expected.append(greedy == answer)
    assert answer_scores(model, examples, batch_size=5)["correct"] == expected
    assert 0 < sum(expected) < len(expected)


def test_lcs_and_rouge_l():
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    assert lcs_length([], [1, 2]) == 0
    assert rouge_l("a b c", "a c") == pytest.approx(0.8)  # P 2/3, R 1
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("", "a") == 0.0


def test_verbmem_with_known_continuations():
    class Tok:
        bos_token_id = None

        def encode(self, text, add_special_tokens=False):
            return [int(w) for w in text.split()]

    model = Bigram(_peaked(6, [(1, 2), (2, 3), (3, 4), (4, 5)]))
    recs = [{"prompt": "1", "continuation": "2 3 4"},  # generated exactly: 1.0
            {"prompt": "3", "continuation": "4 1"}]  # generates 4 5: LCS 1, P = R = 1/2
    assert verbmem(model, Tok(), recs) == pytest.approx((1.0 + 0.5) / 2)
    with pytest.raises(ValueError, match="prompt"):
        verbmem(model, Tok(), [{"text": "1"}])
