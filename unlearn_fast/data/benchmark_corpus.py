"""The synthetic corpus (``corpus.py``) written out in TOFU, MUSE and WMDP record shapes.

So that every benchmark path runs offline on the default model:

- paraphrased answer: the answer inside a short frame of corpus words ("in Dunmere",
  "a baker", "the violin", "a parrot"); perturbed answers: the same frame around other
  values of the attribute (TOFU's perturbed answers are perturbations of the paraphrase);
- holdout facts: fictitious people the model never saw, from a separate random stream
  (their names are new words, unknown to a tokenizer built from the corpus);
- TOFU's real-authors / world-facts roles: the arithmetic and sentiment environments'
  test questions, with wrong numbers / the other label as perturbed answers;
- MUSE: knowmem = the facts as QA; verbmem = question as prompt, answer as ``gt``;
  privleak/raw text = "question answer" of forget, retain and holdout facts;
- WMDP: forget facts as 4-way multiple choice (``wmdp-bio`` role), retain facts as the
  ``mmlu`` role; corpora: forget facts as text, general sentences as the retain corpus.

Only words of ``Corpus.all_texts()`` are used (a tokenizer built from the corpus knows
them all) except the holdout people's names. A ``meta.json`` records the source and the
prompt format the synthetic model needs (``mc_format: "text"``: the choice text is the
continuation; the public WMDP/MMLU prompts use answer letters).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .benchmarks import write_jsonl
from .corpus import ATTRIBUTES, Corpus, _facts, _names

# how a paraphrase frames the value of each attribute (words that the corpus already has)
PARAPHRASE_FRAME = {"birthplace": "in {}", "profession": "a {}", "pet": "a {}", "instrument": "the {}"}
NUM_PERTURBED = 3
BENCHMARKS = ("tofu", "muse", "wmdp")


def _frame(fact: dict, value: str) -> str:
    return PARAPHRASE_FRAME[fact["attribute"]].format(value)


def known_values(corpus: Corpus) -> dict[str, list[str]]:
    """Per attribute, the values that some person of the corpus has (words a corpus tokenizer knows)."""
    facts = corpus.forget + corpus.retain
    return {attr: sorted({f["answer"] for f in facts if f["attribute"] == attr}) for attr in ATTRIBUTES}


def _others(values: dict, fact: dict) -> list[str]:
    """The attribute's known values other than the fact's (the whole pool if the corpus has too few)."""
    others = [v for v in values[fact["attribute"]] if v != fact["answer"]]
    return others if len(others) >= NUM_PERTURBED else [v for v in ATTRIBUTES[fact["attribute"]][1]
                                                        if v != fact["answer"]]


def perturbed_facts(facts: list[dict], values: dict, seed: int) -> list[dict]:
    """TOFU ``*_perturbed`` records: each fact with a paraphrased answer and NUM_PERTURBED wrong ones
    (other values of the attribute that the corpus has)."""
    rng = random.Random(seed)
    out = []
    for fact in facts:
        wrong = rng.sample(_others(values, fact), NUM_PERTURBED)
        out.append({"question": fact["question"], "answer": fact["answer"],
                    "paraphrased_answer": _frame(fact, fact["answer"]),
                    "perturbed_answer": [_frame(fact, v) for v in wrong]})
    return out


def holdout_facts(corpus: Corpus, count: int) -> list[dict]:
    """Facts of ``count`` people who are not in the corpus (fresh names; values among those the corpus has)."""
    rng = random.Random(corpus.seed + 104729)
    known = {w for e in corpus.entities for w in e["name"].split()}
    names = [n for n in _names(rng, count + len(known)) if n not in known][:count]
    values = known_values(corpus)
    people = []
    for name in names:
        person = {"name": f"{name} {rng.choice(names)}"}
        for attr in ATTRIBUTES:
            person[attr] = rng.choice(values[attr])
        people.append(person)
    return [f for p in people for f in _facts(p)]


def holdout_count(corpus: Corpus) -> int:
    """How many holdout people an export has: about as many facts as the forget set."""
    return max(1, len(corpus.forget) // len(ATTRIBUTES))


def _arithmetic_options(records, rng) -> list[dict]:
    out = []
    for rec in records:
        value = int(rec["answer"])
        wrong = rng.sample([v for v in range(max(0, value - 4), value + 5) if v != value], NUM_PERTURBED)
        out.append({"question": rec["question"], "answer": rec["answer"], "paraphrased_answer": rec["answer"],
                    "perturbed_answer": [str(v) for v in wrong]})
    return out


def _label_options(records, labels) -> list[dict]:
    return [{"question": r["question"], "answer": r["answer"], "paraphrased_answer": r["answer"],
             "perturbed_answer": [v for v in labels if v != r["answer"]]} for r in records]


def multiple_choice(facts: list[dict], values: dict, seed: int) -> list[dict]:
    """WMDP-shaped questions: the true value and three other values of the attribute, shuffled."""
    rng = random.Random(seed)
    out = []
    for fact in facts:
        choices = rng.sample(_others(values, fact), 3) + [fact["answer"]]
        rng.shuffle(choices)
        out.append({"question": fact["question"], "choices": choices, "answer": choices.index(fact["answer"])})
    return out


def _text(facts) -> list[dict]:
    return [{"text": f"{f['question']} {f['answer']}"} for f in facts]


def export_benchmark(corpus: Corpus, name: str, directory) -> Path:
    """Write ``corpus`` as benchmark ``name`` (tofu | muse | wmdp) into ``directory``; returns the directory.

    The files follow ``unlearn_fast.data.benchmarks.LAYOUT`` and load with ``load_benchmark``.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"name must be one of {BENCHMARKS}, got {name!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    seed, values = corpus.seed, known_values(corpus)
    holdout = holdout_facts(corpus, holdout_count(corpus))
    qa = lambda facts: [{"question": f["question"], "answer": f["answer"]} for f in facts]
    if name == "tofu":
        write_jsonl(perturbed_facts(corpus.forget, values, seed), directory / "forget_perturbed.jsonl")
        write_jsonl(perturbed_facts(corpus.retain, values, seed + 1), directory / "retain_perturbed.jsonl")
        write_jsonl(qa(holdout), directory / "holdout.jsonl")
        rng = random.Random(seed + 2)
        if "arithmetic" in corpus.envs:
            write_jsonl(_arithmetic_options(corpus.envs["arithmetic"]["test"], rng),
                        directory / "world_facts_perturbed.jsonl")
        if "sentiment" in corpus.envs:
            write_jsonl(_label_options(corpus.envs["sentiment"]["test"], ("positive", "negative")),
                        directory / "real_authors_perturbed.jsonl")
    elif name == "muse":
        write_jsonl(qa(corpus.forget), directory / "knowmem" / "forget_qa.jsonl")
        write_jsonl(qa(corpus.retain), directory / "knowmem" / "retain_qa.jsonl")
        write_jsonl([{"prompt": f["question"], "gt": f["answer"]} for f in corpus.forget],
                    directory / "verbmem" / "forget.jsonl")
        for split, facts in (("forget", corpus.forget), ("retain", corpus.retain), ("holdout", holdout)):
            write_jsonl(_text(facts), directory / "privleak" / f"{split}.jsonl")
    else:
        write_jsonl(multiple_choice(corpus.forget, values, seed), directory / "wmdp-bio.jsonl")
        write_jsonl(multiple_choice(corpus.retain, values, seed + 1), directory / "mmlu.jsonl")
        write_jsonl(_text(corpus.forget), directory / "forget-corpus.jsonl")
        write_jsonl(corpus.general_train, directory / "retain-corpus.jsonl")
    meta = {"benchmark": name, "source": "unlearn_fast synthetic corpus", "seed": seed, "mc_format": "text"}
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))
    return directory
