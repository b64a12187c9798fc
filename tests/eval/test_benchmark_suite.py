"""run_benchmark on the synthetic corpus exported in TOFU / MUSE / WMDP shapes, against naive implementations
(materialised logits, full-logits greedy decoding, sklearn / scipy / rouge_score) on a tiny model."""
import json

import numpy as np
import pytest
import torch

from unlearn_fast.testing.benchmarks import naive_avg_loss, naive_greedy, naive_mia_scores, naive_token_stats, sklearn_auc
from unlearn_fast.testing.tiny import tiny_llama
from unlearn_fast.data.benchmarks import load_benchmark
from unlearn_fast.data.benchmark_corpus import export_benchmark
from unlearn_fast.eval.benchmark_suite import run_benchmark
from unlearn_fast.data.corpus import build_corpus
from unlearn_fast.eval.metrics import encode_qa
from unlearn_fast.recipes.teach import QUICK_MODEL, TeachSpec, build_model, teach
from unlearn_fast.eval.multiple_choice import context_and_continuations, encode_pair, multiple_choice_accuracy
from unlearn_fast.data.tokenizer import WordTokenizer

pytest.importorskip("scipy")
pytest.importorskip("sklearn")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
from scipy import stats

NEW_TOKENS = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    corpus = build_corpus(0, num_entities=8, forget_entities=3, general=10, utility=4, env_train=4, env_test=5)
    tokenizer = WordTokenizer.from_texts(corpus.all_texts())
    root = tmp_path_factory.mktemp("benchmarks")
    dirs = {name: export_benchmark(corpus, name, root / name) for name in ("tofu", "muse", "wmdp")}
    # taught a little (30 steps), so that it answers some questions and ROUGE is not 0 everywhere; the tests
    # compare the suite with naive implementations on this model, whatever it learned
    model = build_model(QUICK_MODEL, len(tokenizer), 0)
    teach(model, tokenizer, corpus, TeachSpec(lr=1e-2, batch_size=16, text_per_batch=4, env_per_batch=4, max_steps=80,
                                              min_steps=80, eval_every=80), progress=lambda _: None)
    return corpus, tokenizer, dirs, model.eval()


def qa_example(tokenizer, question, answer):
    return encode_qa([{"question": question, "answer": answer}], tokenizer, eos=False)[0]


def naive_rouge(model, tokenizer, prompt, target, kind):
    ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
    generated = tokenizer.decode(naive_greedy(model, ids, NEW_TOKENS, tokenizer.eos_token_id))
    reference = tokenizer.decode(tokenizer.encode(" " + target, add_special_tokens=False))
    score = rouge_scorer.RougeScorer(["rougeL"]).score(reference, generated)["rougeL"]
    return score.recall if kind == "recall" else score.fmeasure


def naive_truth_ratios(model, tokenizer, records, key):
    out = []
    for r in records:
        correct = np.exp(-naive_avg_loss(model, qa_example(tokenizer, r["question"], r[key])))
        wrong = np.exp(-np.mean([naive_avg_loss(model, qa_example(tokenizer, r["question"], w))
                                 for w in r["perturbed_answer"]]))
        out.append(wrong / (correct + 1e-10))
    return np.array(out)


def test_tofu_suite_matches_naive(setup):
    _, tokenizer, dirs, model = setup
    data = load_benchmark("tofu", dirs["tofu"])
    retain_model = tiny_llama(vocab=len(tokenizer), layers=2, seed=6).eval()
    reference = run_benchmark(retain_model, tokenizer, "tofu", dirs["tofu"], max_new_tokens=NEW_TOKENS,
                              batch_size=3, progress=False)
    ref_file = dirs["tofu"].parent / "retain_eval.json"
    ref_file.write_text(json.dumps({"benchmark": reference}))
    got = run_benchmark(model, tokenizer, "tofu", dirs["tofu"], reference=ref_file, max_new_tokens=NEW_TOKENS,
                        batch_size=3, progress=False)
    tol = dict(rel=1e-4, abs=1e-6)

    def prob(records, key="answer"):
        return np.mean([np.exp(-naive_avg_loss(model, qa_example(tokenizer, r["question"], r[key]))) for r in records])

    expect = {}
    for split, records in (("forget", data.forget), ("retain", data.retain)):
        expect[f"{split}_Q_A_Prob"] = prob(records)
        expect[f"{split}_Q_A_PARA_Prob"] = prob(records, "paraphrased_answer")
        expect[f"{split}_Q_A_ROUGE"] = np.mean([naive_rouge(model, tokenizer, r["question"], r["answer"], "recall")
                                                for r in records])
    forget_tr = naive_truth_ratios(model, tokenizer, data.forget, "paraphrased_answer")
    expect["forget_truth_ratio"] = np.mean(np.minimum(forget_tr, 1 / forget_tr))
    expect["retain_Truth_Ratio"] = np.mean(np.maximum(0, 1 - naive_truth_ratios(model, tokenizer, data.retain,
                                                                                "paraphrased_answer")))
    for prefix, records in (("ra", data.real_authors), ("wf", data.world_facts)):
        normalised = []
        for r in records:
            pc = np.exp(-naive_avg_loss(model, qa_example(tokenizer, r["question"], r["answer"])))
            pw = sum(np.exp(-naive_avg_loss(model, qa_example(tokenizer, r["question"], w)))
                     for w in r["perturbed_answer"])
            normalised.append(pc / (pc + pw))
        expect[f"{prefix}_Q_A_Prob_normalised"] = np.mean(normalised)
        expect[f"{prefix}_Truth_Ratio"] = np.mean(np.maximum(0, 1 - naive_truth_ratios(model, tokenizer, records,
                                                                                       "answer")))
        expect[f"{prefix}_Q_A_ROUGE"] = np.mean([naive_rouge(model, tokenizer, r["question"], r["answer"], "recall")
                                                 for r in records])
    for key, value in expect.items():
        assert got[key] == pytest.approx(value, **tol), key
    assert got["forget_Q_A_ROUGE"] > 0 and got["retain_Q_A_ROUGE"] > 0  # the comparison is not of zeros
    parts = [got[k] for k in ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio", "ra_Q_A_Prob_normalised",
                              "ra_Q_A_ROUGE", "ra_Truth_Ratio", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE",
                              "wf_Truth_Ratio")]
    assert got["model_utility"] == pytest.approx(stats.hmean(parts) if min(parts) > 0 else 0.0, **tol)
    retain_tr = naive_truth_ratios(retain_model, tokenizer, data.forget, "paraphrased_answer")
    assert got["forget_quality"] == pytest.approx(stats.ks_2samp(forget_tr, retain_tr).pvalue, **tol)
    # membership inference: forget vs holdout answers
    forget = [qa_example(tokenizer, r["question"], r["answer"]) for r in data.forget]
    holdout = [qa_example(tokenizer, r["question"], r["answer"]) for r in data.holdout]
    sf, sh = naive_mia_scores(model, tokenizer, forget), naive_mia_scores(model, tokenizer, holdout)
    for attack in ("loss", "zlib", "min_k", "min_k_plus_plus"):
        assert got[f"mia_{attack}"] == pytest.approx(sklearn_auc(sf[attack], sh[attack]), abs=1e-9), attack
    ref_auc = reference["mia_min_k"]
    assert got["privleak"] == pytest.approx(((1 - got["mia_min_k"]) - (1 - ref_auc)) / (1 - ref_auc) * 100, **tol)
    assert got["config"]["benchmark"] == "tofu" and len(got["raw"]["forget_truth_ratios"]) == len(data.forget)
    assert run_benchmark(model, tokenizer, "tofu", dirs["tofu"], max_new_tokens=1, progress=False)[
        "forget_quality"] is None


def test_muse_suite_matches_naive(setup):
    _, tokenizer, dirs, model = setup
    data = load_benchmark("muse", dirs["muse"])
    got = run_benchmark(model, tokenizer, "muse", dirs["muse"], max_new_tokens=NEW_TOKENS, batch_size=4,
                        progress=False)
    for split, records in (("forget", data.forget_knowmem), ("retain", data.retain_knowmem)):
        expect = np.mean([naive_rouge(model, tokenizer, r["question"], r["answer"], "f1") for r in records])
        assert got[f"{split}_knowmem_ROUGE"] == pytest.approx(expect, rel=1e-6), split
    expect = np.mean([naive_rouge(model, tokenizer, r["prompt"], r["gt"], "f1") for r in data.verbmem])
    assert got["forget_verbmem_ROUGE"] == pytest.approx(expect, rel=1e-6)

    def text_example(rec):
        ids = [tokenizer.bos_token_id] + tokenizer.encode(rec["text"], add_special_tokens=False)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)}

    sf = naive_mia_scores(model, tokenizer, [text_example(r) for r in data.forget_text])
    sh = naive_mia_scores(model, tokenizer, [text_example(r) for r in data.holdout_text])
    for attack in ("loss", "zlib", "min_k", "min_k_plus_plus"):
        assert got[f"mia_{attack}"] == pytest.approx(sklearn_auc(sf[attack], sh[attack]), abs=1e-9), attack
    assert got["privleak"] == pytest.approx(((1 - got["mia_min_k"]) - 0.5) / 0.5 * 100)


@pytest.mark.parametrize("fmt", ["text", "letters"])
def test_wmdp_suite_and_multiple_choice_match_naive(setup, fmt):
    _, tokenizer, dirs, model = setup
    data = load_benchmark("wmdp", dirs["wmdp"])
    got = run_benchmark(model, tokenizer, "wmdp", dirs["wmdp"], mc_format=fmt, batch_size=4, progress=False)
    assert got["config"]["mc_format"] == fmt
    for stem, records in data.questions.items():
        subject = {"wmdp-bio": "biology"}.get(stem)
        correct = correct_norm = 0
        for r in records:
            context, conts = context_and_continuations(r, fmt, subject)
            lls = np.array([float(naive_token_stats(model, encode_pair(tokenizer, context, c))[0].double().sum())
                            for c in conts])
            lengths = np.array([1.0] * len(conts) if fmt == "letters" else [len(c) for c in r["choices"]])
            correct += int(np.argmax(lls) == r["answer"])
            correct_norm += int(np.argmax(lls / lengths) == r["answer"])
        key = stem.replace("-", "_")
        assert got[key] == pytest.approx(correct / len(records)), key
        assert got[f"{key}_acc_norm"] == pytest.approx(correct_norm / len(records)), key
    # the synthetic export asks for the text format in its meta.json
    assert run_benchmark(model, tokenizer, "wmdp", dirs["wmdp"], progress=False)["config"]["mc_format"] == "text"


def test_multiple_choice_hand_made_letters_prompt():
    rec = {"question": " Which one ? ", "choices": ["x", "y"], "answer": 1}
    context, conts = context_and_continuations(rec, "letters", "biology")
    assert context == ("The following are multiple choice questions (with answers) about biology.\n\n"
                       "Which one ?\nA. x\nB. y\nAnswer:")
    assert conts == [" A", " B"]
    with pytest.raises(ValueError, match="fmt"):
        context_and_continuations(rec, "latex")
    with pytest.raises(ValueError, match="at least one"):
        multiple_choice_accuracy(None, None, [])


def test_run_benchmark_bad_arguments(setup, tmp_path):
    _, tokenizer, dirs, model = setup
    with pytest.raises(ValueError, match="name"):
        run_benchmark(model, tokenizer, "mmlu", dirs["tofu"])
    with pytest.raises(ValueError, match="batch_size"):
        run_benchmark(model, tokenizer, "tofu", dirs["tofu"], batch_size=0)
    with pytest.raises(ValueError, match="prompt_template"):
        run_benchmark(model, tokenizer, "tofu", dirs["tofu"], prompt_template="Q:")
    with pytest.raises(FileNotFoundError, match="forget"):
        run_benchmark(model, tokenizer, "tofu", tmp_path)


def test_acc_norm_divides_by_the_choice_length():
    from unlearn_fast.testing.benchmarks import KnownLM

    tokenizer = WordTokenizer(["<pad>", "<bos>", "<eos>", "<unk>", "q", "x", "yyyyyy"])
    probs = torch.full((7, 7), 0.1)
    probs[1, 4] = 0.4  # bos -> q
    probs[4, 5], probs[4, 6] = 0.3, 0.2  # after q: x more likely than yyyyyy
    model = KnownLM(probs / probs.sum(1, keepdim=True))
    # log P(x) = log 0.3 > log P(yyyyyy) = log 0.2, but per character −1.20 < −0.27: acc picks x, acc_norm yyyyyy
    question = {"question": "q", "choices": ["x", "yyyyyy"], "answer": 1}
    res = multiple_choice_accuracy(model, tokenizer, [question], fmt="text")
    assert res["acc"] == 0.0 and res["acc_norm"] == 1.0


def test_tofu_rouge_is_recall_and_muse_rouge_is_f1(setup, monkeypatch):
    """With every generation = 'born in ' + the answer, recall is 1 and F1 is 1/2 for one-word answers."""
    import unlearn_fast.eval.benchmark_suite as suite

    _, tokenizer, dirs, model = setup
    answer_of = {}
    for name, key in (("tofu", "forget"), ("muse", "forget_knowmem")):
        for r in getattr(load_benchmark(name, dirs[name]), key):
            answer_of[r["question"]] = r["answer"]
    monkeypatch.setattr(suite, "generate", lambda m, t, prompts, **kw: [f"born in {answer_of.get(p, 'x y')}"
                                                                         for p in prompts])
    tofu = run_benchmark(model, tokenizer, "tofu", dirs["tofu"], progress=False)
    assert tofu["forget_Q_A_ROUGE"] == pytest.approx(1.0)
    muse = run_benchmark(model, tokenizer, "muse", dirs["muse"], progress=False)
    assert muse["forget_knowmem_ROUGE"] == pytest.approx(0.5)


def test_generate_keeps_the_prompt_when_the_continuation_does_not_fit(setup):
    """max_new_tokens beyond the context: the continuation is cut to fit, never the prompt (as naive greedy)."""
    from unlearn_fast.eval.benchmark_suite import generate

    corpus, tokenizer, _, model = setup
    prompts = [f["question"] for f in corpus.forget[:3]] + ["The quiet river"]
    limit = model.config.max_position_embeddings
    got = generate(model, tokenizer, prompts, max_new_tokens=10 * limit, batch_size=2)
    for prompt, text in zip(prompts, got):
        ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
        expect = tokenizer.decode(naive_greedy(model, ids, limit - len(ids), tokenizer.eos_token_id))
        assert text == expect.strip(), prompt


def test_corpus_benchmark_metrics_match_naive_and_the_exported_tofu_suite(setup):
    """The main job's columns: computed in memory from the corpus, they equal the naive truth ratios, scipy's KS
    p-value against a reference model's ratios, sklearn's min-k%++ AUC, and run_benchmark on the exported files."""
    from unlearn_fast.eval.benchmark_suite import corpus_benchmark_metrics

    corpus, tokenizer, dirs, model = setup
    data = load_benchmark("tofu", dirs["tofu"])
    reference_model = tiny_llama(vocab=len(tokenizer), layers=2, seed=6).eval()
    reference = corpus_benchmark_metrics(reference_model, tokenizer, corpus, batch_size=3)
    assert reference["forget_quality"] is None
    got = corpus_benchmark_metrics(model, tokenizer, corpus, reference_truth_ratios=reference["forget_truth_ratios"],
                                   batch_size=3)

    ratios = naive_truth_ratios(model, tokenizer, data.forget, "paraphrased_answer")
    ref_ratios = naive_truth_ratios(reference_model, tokenizer, data.forget, "paraphrased_answer")
    assert got["forget_truth_ratios"] == pytest.approx(ratios.tolist(), rel=1e-4)
    assert got["forget_truth_ratio"] == pytest.approx(np.mean(np.minimum(ratios, 1 / ratios)), rel=1e-4)
    assert got["forget_quality"] == pytest.approx(stats.ks_2samp(ratios, ref_ratios, method="exact").pvalue,
                                                  rel=1e-6)
    qa = lambda rs: [qa_example(tokenizer, r["question"], r["answer"]) for r in rs]
    sf, sh = naive_mia_scores(model, tokenizer, qa(data.forget)), naive_mia_scores(model, tokenizer, qa(data.holdout))
    assert got["mia_min_k_plus_plus"] == pytest.approx(sklearn_auc(sf["min_k_plus_plus"], sh["min_k_plus_plus"]),
                                                       abs=1e-9)
    suite = run_benchmark(model, tokenizer, "tofu", dirs["tofu"], reference={"raw": {
        "forget_truth_ratios": reference["forget_truth_ratios"]}}, max_new_tokens=1, batch_size=3, progress=False)
    for key in ("forget_truth_ratio", "forget_quality", "mia_min_k_plus_plus"):
        assert got[key] == pytest.approx(suite[key], rel=1e-9), key
