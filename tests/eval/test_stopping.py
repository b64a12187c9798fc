"""ForgetLevelStop: the matched-forget-level stopping rule, against answer_accuracy computed directly."""
import pytest
import torch

from unlearn_fast.data.corpus import build_corpus
from unlearn_fast.eval.metrics import answer_accuracy, encode_qa
from unlearn_fast.recipes.teach import QUICK_MODEL, build_model
from unlearn_fast.eval.stopping import ForgetLevelStop
from unlearn_fast.data.tokenizer import WordTokenizer
from unlearn_fast.data.collate import collate


@pytest.fixture(scope="module")
def setup():
    corpus = build_corpus(0, num_entities=6, forget_entities=2, general=4, utility=2, env_train=2, env_test=2)
    tok = WordTokenizer.from_texts(corpus.all_texts())
    model = build_model(QUICK_MODEL, len(tok), seed=0)
    return model, encode_qa(corpus.forget, tok), encode_qa(corpus.forget, tok, eos=False)


def test_checks_every_k_steps_and_stops_at_the_target(setup):
    model, _, probe = setup
    p0 = answer_accuracy(model, probe)["prob"]
    stop = ForgetLevelStop(probe, min(1.0, p0 + 1e-6), every=3)
    model.train()
    assert [stop(model, s) for s in (1, 2)] == [False, False] and stop.history == []  # not a check step
    assert stop(model, 3) and stop.stopped_at == 3 and stop.history == [(3, pytest.approx(p0))]
    assert model.training  # the mode it was in
    assert stop(model, 4)  # stays stopped
    never = ForgetLevelStop(probe, p0 * 0.5)
    assert not never(model, 1) and never.stopped_at is None


def test_gradient_ascent_stops_at_the_first_check_below_target(setup):
    base, train, probe = setup
    model = build_model(QUICK_MODEL, base.config.vocab_size, seed=0)
    model.load_state_dict(base.state_dict())
    target = 0.5 * answer_accuracy(model, probe)["prob"]
    stop = ForgetLevelStop(probe, target, every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = collate(train)
    for step in range(1, 200):
        opt.zero_grad()
        (-model(**batch).loss).backward()  # gradient ascent: the answers' probability falls
        opt.step()
        if stop(model, step):
            break
    assert stop.stopped_at == step and step % 2 == 0
    assert answer_accuracy(model, probe)["prob"] == pytest.approx(stop.history[-1][1])
    assert stop.history[-1][1] <= target
    assert all(v > target for _, v in stop.history[:-1])


def test_bad_arguments_are_named(setup):
    _, _, probe = setup
    for kw, name in ((dict(target=1.5), "target"), (dict(target=0.1, metric="nll"), "metric"),
                     (dict(target=0.1, every=0), "every")):
        with pytest.raises(ValueError, match=name):
            ForgetLevelStop(probe, **kw)
    with pytest.raises(ValueError, match="probe"):
        ForgetLevelStop([], 0.1)


def _scripted(monkeypatch, value_at):
    """answer_accuracy replaced by a scripted forget probability per step (the step is read from the stop)."""
    import unlearn_fast.eval.stopping as stopping

    state = {}
    monkeypatch.setattr(stopping, "answer_accuracy", lambda model, probe, **kw: {"prob": value_at(state["step"]),
                                                                                 "acc": 0.0})
    return state


def _drive(stop, state, last=300):
    for step in range(1, last + 1):
        state["step"] = step
        if stop(None, step):
            return step
    return None


def test_adaptive_checks_thin_out_far_from_the_target_and_stop_at_the_crossing(monkeypatch):
    state = _scripted(monkeypatch, lambda s: 1.0 - 0.01 * s)  # linear: first at or below 0.5 at step 50
    stop = ForgetLevelStop([{"input_ids": [1]}], 0.5, adaptive=True, max_skip=10)
    assert _drive(stop, state) == 50 == stop.stopped_at
    steps = [s for s, _ in stop.history]
    assert len(steps) < 15 and steps[:2] == [1, 2] and steps[-3:] == [48, 49, 50]  # every step near the target
    assert all(0 < b - a <= 10 for a, b in zip(steps, steps[1:]))
    assert all(v > 0.5 for _, v in stop.history[:-1])
    every = ForgetLevelStop([{"input_ids": [1]}], 0.5)  # the plain rule checks all 50
    assert _drive(every, state) == 50 and len(every.history) == 50


def test_adaptive_overshoot_on_a_sudden_drop_is_at_most_one_skip(monkeypatch):
    state = _scripted(monkeypatch, lambda s: 0.9 - 0.001 * s if s < 30 else 0.1)
    stop = ForgetLevelStop([{"input_ids": [1]}], 0.5, adaptive=True, max_skip=7)
    stopped = _drive(stop, state)
    assert 30 <= stopped < 30 + 7 and stop.history[-1] == (stopped, 0.1)
    with pytest.raises(ValueError, match="max_skip"):
        ForgetLevelStop([{"input_ids": [1]}], 0.5, every=3, max_skip=2)


def test_adaptive_checks_every_step_within_near_of_the_target(monkeypatch):
    # a slow average rate would predict many steps left, but the value sits within `near` of the target
    state = _scripted(monkeypatch, lambda s: 0.525 - 0.0001 * s if s < 50 else 0.49)
    stop = ForgetLevelStop([{"input_ids": [1]}], 0.5, adaptive=True, max_skip=10, near=0.03)
    assert _drive(stop, state) == 50 and len(stop.history) == 50
