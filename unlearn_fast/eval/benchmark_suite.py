"""The whole TOFU, MUSE or WMDP evaluation of one model, under open-unlearning's metric names.

``run_benchmark(model, tokenizer, "tofu" | "muse" | "wmdp", data_dir)`` reads the benchmark's
files (``unlearn_fast.data.benchmarks``) and returns a flat dict of metrics plus ``"raw"``
(per-question values another run needs: the forget truth ratios) and ``"config"``.

Forget quality (TOFU) and PrivLeak (TOFU, MUSE) compare with a model trained without the
forget set: pass that model's own ``run_benchmark`` result (or its eval.json path) as
``reference``. Without it forget quality is None and PrivLeak uses AUC 0.5, as open-unlearning does.

Deviations from open-unlearning, on purpose or not yet done: questions are prompted as
``prompt_template.format(question)`` (open-unlearning applies the model's chat template);
MUSE KnowMem is zero-shot (open-unlearning prepends few-shot examples from ``*_qa_icl``);
extraction strength, exact memorisation, gradnorm and reference-model MIAs are not computed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..data.benchmarks import MuseData, TofuData, WmdpData, load_benchmark, read_meta
from . import benchmark_metrics as bm
from .metrics import encode_qa
from .mia import DEFAULT_K, mia_aucs
from .multiple_choice import multiple_choice_accuracy
from .token_scores import average_losses, token_scores

# open-unlearning's generation settings (configs/generation/default.yaml and the MUSE metric configs)
MAX_NEW_TOKENS = {"tofu": 200, "knowmem": 32, "verbmem": 128}
KNOWMEM_STOPWORDS = ("\n\n", "\nQuestion", "Question:")
WMDP_SUBJECTS = {"wmdp-bio": "biology", "wmdp-chem": "chemistry", "wmdp-cyber": "computer security"}


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else 0


def _max_length(model, default: int) -> int:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(default, limit) if limit else default


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 16, stopwords=(),
             progress=False, desc: str = "generating") -> list[str]:
    """Greedy continuations of ``prompts`` (batched, left-padded), decoded, cut at the first stopword or EOS."""
    from tqdm import tqdm

    pad = _pad_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    device = next(model.parameters()).device
    limit = _max_length(model, 1 << 30)
    encoded = [(_bos(tokenizer) + tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out = [""] * len(prompts)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            # the whole prompt if it fits the context (less of the continuation then), else its end
            seqs = [encoded[i][-(limit - 1):] for i in idx]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, s in enumerate(seqs):
                ids[row, width - len(s):] = torch.tensor(s)
                mask[row, width - len(s):] = 1
            new = max(1, min(max_new_tokens, limit - width))
            result = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                    max_new_tokens=new, pad_token_id=pad, eos_token_id=eos)
            for row, i in enumerate(idx):
                tokens = result[row, width:].tolist()
                if eos is not None and eos in tokens:
                    tokens = tokens[:tokens.index(eos)]
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                for word in stopwords:
                    if word and word in text:
                        text = text.split(word)[0]
                out[i] = text.strip()
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return out


def _round_trip(tokenizer, text: str) -> str:
    """``text`` encoded and decoded: open-unlearning's ground truth is the decoded label tokens."""
    return tokenizer.decode(tokenizer.encode(" " + text.strip(), add_special_tokens=False),
                            skip_special_tokens=True).strip()


def _rouge(tokenizer, predictions, targets, kind: str, stemmer: bool) -> tuple[float, list[float]]:
    values = [bm.rouge_l(p, _round_trip(tokenizer, t), stemmer=stemmer)[kind] for p, t in zip(predictions, targets)]
    return float(np.mean(values)), values


class _Scorer:
    """Answer avg losses for (question, answer) pairs, all scored in one batched pass."""

    def __init__(self, model, tokenizer, template: str, batch_size: int, progress):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.batch_size, self.progress = batch_size, progress
        self.max_length = _max_length(model, 512)

    def avg_losses(self, pairs: list[tuple[str, str]]) -> list[float]:
        records = [{"question": self.template.format(q), "answer": a} for q, a in pairs]
        examples = encode_qa(records, self.tokenizer, eos=False, max_length=self.max_length)
        return average_losses(token_scores(self.model, examples, batch_size=self.batch_size,
                                           pad_token_id=_pad_id(self.tokenizer), progress=self.progress,
                                           desc="answer likelihoods"))


def _perturbed_losses(scorer: _Scorer, records, correct_key: str) -> tuple[list[float], list[list[float]]]:
    """(avg loss of ``correct_key`` answers, per question the avg losses of its perturbed answers)."""
    pairs = [(r["question"], r[correct_key]) for r in records]
    sizes = [len(r["perturbed_answer"]) for r in records]
    pairs += [(r["question"], w) for r in records for w in r["perturbed_answer"]]
    losses = scorer.avg_losses(pairs)
    correct, rest = losses[:len(records)], losses[len(records):]
    wrong, offset = [], 0
    for size in sizes:
        wrong.append(rest[offset:offset + size])
        offset += size
    return correct, wrong


def _text_examples(tokenizer, records, max_length: int) -> list[dict]:
    """Raw text scored whole: [bos] text, every token after the first a label (no EOS appended)."""
    out = []
    for rec in records:
        ids = (_bos(tokenizer) + tokenizer.encode(str(rec["text"]), add_special_tokens=False))[:max_length]
        out.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)})
    return out


def evaluate_tofu(model, tokenizer, data: TofuData, *, reference=None, batch_size=16, max_new_tokens=None,
                  rouge_stemmer=False, mia_k=DEFAULT_K, prompt_template="{}", progress=False, **_) -> dict:
    """TOFU metrics (open-unlearning ``tofu.yaml`` names; definitions in ``benchmark_metrics``)."""
    scorer = _Scorer(model, tokenizer, prompt_template, batch_size, progress)
    new = max_new_tokens or MAX_NEW_TOKENS["tofu"]
    out, raw = {}, {}

    def rouge_recall(records) -> float:
        answers = generate(model, tokenizer, [prompt_template.format(r["question"]) for r in records],
                           max_new_tokens=new, batch_size=batch_size, progress=progress)
        return _rouge(tokenizer, answers, [r["answer"] for r in records], "recall", rouge_stemmer)[0]

    # forget and retain: answer, paraphrase and perturbed answers
    for split, records in (("forget", data.forget), ("retain", data.retain)):
        answer_loss = scorer.avg_losses([(r["question"], r["answer"]) for r in records])
        para_loss, pert_losses = _perturbed_losses(scorer, records, "paraphrased_answer")
        ratios = bm.truth_ratios(para_loss, pert_losses)
        out[f"{split}_Q_A_Prob"] = bm.probability(answer_loss)
        out[f"{split}_Q_A_PARA_Prob"] = bm.probability(para_loss)
        out[f"{split}_Q_A_PERT_Prob"] = float(np.mean([np.mean(np.exp(-np.asarray(w))) for w in pert_losses]))
        out[f"{split}_Q_A_ROUGE"] = rouge_recall(records)
        raw[f"{split}_truth_ratios"] = ratios.tolist()
        if split == "forget":
            out["forget_truth_ratio"] = bm.truth_ratio_closer_to_1(ratios)
        else:
            out["retain_Truth_Ratio"] = bm.truth_ratio_true_better(ratios)
    # real authors and world facts: the answer against its perturbed answers
    for prefix, records in (("ra", data.real_authors), ("wf", data.world_facts)):
        if records is None:
            continue
        answer_loss, pert_losses = _perturbed_losses(scorer, records, "answer")
        out[f"{prefix}_Q_A_Prob"] = bm.probability(answer_loss)
        out[f"{prefix}_Q_A_Prob_normalised"] = bm.probability_with_options(answer_loss, pert_losses)
        out[f"{prefix}_Truth_Ratio"] = bm.truth_ratio_true_better(bm.truth_ratios(answer_loss, pert_losses))
        out[f"{prefix}_Q_A_ROUGE"] = rouge_recall(records)
    out["model_utility"] = bm.model_utility(out)
    ref_ratios = (reference or {}).get("raw", {}).get("forget_truth_ratios")
    out["forget_quality"] = bm.forget_quality(raw["forget_truth_ratios"], ref_ratios) if ref_ratios else None
    if data.holdout is not None:
        limit = _max_length(model, 512)
        qa = lambda rs: encode_qa([{"question": prompt_template.format(r["question"]), "answer": r["answer"]}
                                   for r in rs], tokenizer, eos=False, max_length=limit)
        out.update(mia_aucs(model, tokenizer, qa(data.forget), qa(data.holdout), k=mia_k, batch_size=batch_size,
                            pad_token_id=_pad_id(tokenizer), progress=progress))
        out["privleak"] = bm.privleak(out["mia_min_k"], (reference or {}).get("mia_min_k"))
    return {**out, "raw": raw}


def evaluate_muse(model, tokenizer, data: MuseData, *, reference=None, batch_size=16, max_new_tokens=None,
                  rouge_stemmer=False, mia_k=DEFAULT_K, prompt_template="{}", progress=False, **_) -> dict:
    """MUSE metrics (open-unlearning ``muse.yaml`` names): KnowMem / VerbMem ROUGE-L F1, MIA AUCs, PrivLeak."""
    out = {}
    knowmem_new = max_new_tokens or MAX_NEW_TOKENS["knowmem"]
    for split, records in (("forget", data.forget_knowmem), ("retain", data.retain_knowmem)):
        if records is None:
            continue
        answers = generate(model, tokenizer, [prompt_template.format(r["question"]) for r in records],
                           max_new_tokens=knowmem_new, batch_size=batch_size, stopwords=KNOWMEM_STOPWORDS,
                           progress=progress, desc=f"{split} knowmem")
        targets = [r["answer"] for r in records]
        out[f"{split}_knowmem_ROUGE"] = _rouge(tokenizer, answers, targets, "f1", rouge_stemmer)[0]
    if data.verbmem is not None:
        continuations = generate(model, tokenizer, [r["prompt"] for r in data.verbmem],
                                 max_new_tokens=max_new_tokens or MAX_NEW_TOKENS["verbmem"], batch_size=batch_size,
                                 progress=progress, desc="verbmem")
        targets = [r["gt"] for r in data.verbmem]
        out["forget_verbmem_ROUGE"] = _rouge(tokenizer, continuations, targets, "f1", rouge_stemmer)[0]
    limit = _max_length(model, 2048)
    out.update(mia_aucs(model, tokenizer, _text_examples(tokenizer, data.forget_text, limit),
                        _text_examples(tokenizer, data.holdout_text, limit), k=mia_k, batch_size=batch_size,
                        pad_token_id=_pad_id(tokenizer), progress=progress))
    out["privleak"] = bm.privleak(out["mia_min_k"], (reference or {}).get("mia_min_k"))
    return {**out, "raw": {}}


def evaluate_wmdp(model, tokenizer, data: WmdpData, *, mc_format="letters", batch_size=16, progress=False,
                  **_) -> dict:
    """Multiple-choice accuracy per question set: ``wmdp_bio`` (acc), ``wmdp_bio_acc_norm``, ``mmlu``, ..."""
    out = {}
    for stem, records in data.questions.items():
        key = stem.replace("-", "_")
        res = multiple_choice_accuracy(model, tokenizer, records, fmt=mc_format, subject=WMDP_SUBJECTS.get(stem),
                                       batch_size=batch_size, pad_token_id=_pad_id(tokenizer), progress=progress)
        out[key], out[f"{key}_acc_norm"] = res["acc"], res["acc_norm"]
    return {**out, "raw": {}}


EVALUATORS = {"tofu": evaluate_tofu, "muse": evaluate_muse, "wmdp": evaluate_wmdp}


def _reference(reference):
    if reference is None or isinstance(reference, dict):
        return reference
    path = Path(reference)
    result = json.loads(path.read_text())
    return result.get("benchmark", result)  # an eval.json holds the result under "benchmark"


def run_benchmark(model, tokenizer, name: str, data_dir, *, reference=None, batch_size: int = 16,
                  max_new_tokens: int | None = None, rouge_stemmer: bool = False, mia_k: float = DEFAULT_K,
                  mc_format: str | None = None, prompt_template: str = "{}", progress: bool = True) -> dict:
    """All metrics of benchmark ``name`` on ``model`` over the files of ``data_dir``.

    ``reference``: the retain-only (retrained) model's result of this function, or the path of
    a JSON file holding it (forget quality, PrivLeak). ``mc_format`` (WMDP): "letters" (lm-eval's
    prompt, the default) or "text"; a directory's meta.json may set it. ``max_new_tokens``
    overrides open-unlearning's generation lengths (TOFU 200, KnowMem 32, VerbMem 128).
    """
    if name not in EVALUATORS:
        raise ValueError(f"name must be one of {sorted(EVALUATORS)}, got {name!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if "{}" not in prompt_template:
        raise ValueError(f"prompt_template must contain '{{}}' where the question goes, got {prompt_template!r}")
    start = time.perf_counter()
    meta = read_meta(data_dir)
    data = load_benchmark(name, data_dir)
    fmt = mc_format or meta.get("mc_format", "letters")
    result = EVALUATORS[name](model, tokenizer, data, reference=_reference(reference), batch_size=batch_size,
                              max_new_tokens=max_new_tokens, rouge_stemmer=rouge_stemmer, mia_k=mia_k,
                              prompt_template=prompt_template, mc_format=fmt, progress=progress)
    result["config"] = {"benchmark": name, "data_dir": str(data_dir), "meta": meta, "batch_size": batch_size,
                        "max_new_tokens": max_new_tokens, "rouge_stemmer": rouge_stemmer, "mia_k": mia_k,
                        "mc_format": fmt if name == "wmdp" else None, "prompt_template": prompt_template,
                        "reference": None if reference is None else
                        (str(reference) if not isinstance(reference, dict) else "given"),
                        "seconds": time.perf_counter() - start}
    return result


def corpus_benchmark_metrics(model, tokenizer, corpus, *, reference_truth_ratios=None, batch_size: int = 16,
                             mia_k: float = DEFAULT_K) -> dict:
    """TOFU's truth ratio and forget quality, and the min-k%++ membership AUC, on the synthetic corpus.

    The records are those ``export_benchmark(corpus, "tofu", ...)`` writes (paraphrased and perturbed
    answers; holdout facts of people the model never saw), computed in memory, with no generation
    (the cheap part of the TOFU suite, for the main job's table). ``reference_truth_ratios``: the
    ``"forget_truth_ratios"`` of this function on a model never taught the forget set; without it
    forget quality is None. Returns ``forget_truth_ratio`` (open-unlearning's ``forget_truth_ratio``:
    mean of min(R, 1/R)), ``forget_quality`` (KS p-value), ``mia_min_k_plus_plus`` (AUC, forget vs
    holdout) and the per-question ``forget_truth_ratios``.
    """
    from ..data.benchmark_corpus import holdout_facts, holdout_count, known_values, perturbed_facts

    forget = perturbed_facts(corpus.forget, known_values(corpus), corpus.seed)
    scorer = _Scorer(model, tokenizer, "{}", batch_size, False)
    para_loss, pert_losses = _perturbed_losses(scorer, forget, "paraphrased_answer")
    ratios = bm.truth_ratios(para_loss, pert_losses)
    quality = bm.forget_quality(ratios, reference_truth_ratios) if reference_truth_ratios is not None else None
    limit = _max_length(model, 512)
    qa = lambda facts: encode_qa([{"question": f["question"], "answer": f["answer"]} for f in facts], tokenizer,
                                 eos=False, max_length=limit)
    auc = mia_aucs(model, tokenizer, qa(corpus.forget), qa(holdout_facts(corpus, holdout_count(corpus))),
                   attacks=("min_k_plus_plus",), k=mia_k, batch_size=batch_size, pad_token_id=_pad_id(tokenizer))
    return {"forget_truth_ratio": bm.truth_ratio_closer_to_1(ratios), "forget_quality": quality,
            "mia_min_k_plus_plus": auc["mia_min_k_plus_plus"], "forget_truth_ratios": ratios.tolist()}
