"""A deterministic synthetic knowledge corpus (SPEC §2 in miniature).

Fictitious people, each with a few attributes, as question/answer records:
    {"question": "Where was Velor Ashkin born ?", "answer": "Dunmere"}
The people are split into a forget set and a retain set (every fact of a
person lands in the same split, so forgetting a person is a clean cut).
Besides the facts there are
  - general sentences (templated grammar), whose held-out part measures
    utility as perplexity;
  - unrelated fine-tuning environments in the roles of GSM8K, SST-2 and QQP:
    arithmetic word problems, templated sentiment, paraphrase pairs.
Everything is drawn from one ``random.Random(seed)``: the same seed gives
identical records, on any machine.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "br", "kr", "st"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ou"]
_CODAS = ["", "n", "r", "l", "s", "th", "m", "k"]

ATTRIBUTES = {
    # attribute: (question template, value pool)
    "birthplace": ("Where was {name} born ?", ["Dunmere", "Calvast", "Ostrel", "Mirrowdale", "Quenby", "Harlow",
                                               "Tessaly", "Brackenford", "Ilvarne", "Sundrop"]),
    "profession": ("What does {name} do for a living ?", ["baker", "pilot", "surgeon", "carpenter", "poet",
                                                          "lawyer", "farmer", "chemist", "sailor", "painter"]),
    "pet": ("Which animal does {name} keep as a pet ?", ["parrot", "tortoise", "ferret", "goat", "lizard",
                                                         "rabbit", "owl", "hamster", "pony", "snake"]),
    "instrument": ("Which instrument does {name} play ?", ["violin", "harp", "drums", "flute", "cello",
                                                           "trumpet", "piano", "banjo", "oboe", "lute"]),
}

_ADJ = ["quiet", "bright", "old", "small", "green", "heavy", "warm", "tall", "cold", "happy"]
_NOUN = ["river", "garden", "teacher", "window", "market", "child", "train", "forest", "letter", "kitchen"]
_VERB = ["watches", "follows", "finds", "paints", "visits", "leaves", "opens", "passes", "reaches", "carries"]
_PLACE = ["near the hill", "in the morning", "after the rain", "by the road", "before dinner", "at the station"]

_POS = ["wonderful", "delightful", "moving", "brilliant", "charming", "superb"]
_NEG = ["boring", "dreadful", "clumsy", "tedious", "awful", "bland"]
_THING = ["film", "book", "show", "meal", "concert", "play"]

_SYNONYMS = [("big", "large"), ("quick", "fast"), ("begin", "start"), ("end", "finish"), ("buy", "purchase"),
             ("help", "assist"), ("shut", "close"), ("talk", "speak"), ("smart", "clever"), ("glad", "pleased")]
_SUBJECTS = ["the man", "my friend", "a student", "the doctor", "her brother", "our guide"]


@dataclass
class Corpus:
    seed: int
    entities: list[dict]  # {"name", attribute: value, ...}
    forget: list[dict]  # QA records of the forget entities
    retain: list[dict]  # QA records of the retain entities
    general_train: list[dict]  # {"text"}: learned with the facts
    utility: list[dict]  # {"text"}: held out, for perplexity
    envs: dict[str, dict[str, list[dict]]] = field(default_factory=dict)  # name -> {"train", "test"} QA records

    def all_texts(self):
        """Every string of the corpus (for building a vocabulary)."""
        for rec in self.forget + self.retain:
            yield rec["question"]
            yield rec["answer"]
        for rec in self.general_train + self.utility:
            yield rec["text"]
        for env in self.envs.values():
            for split in env.values():
                for rec in split:
                    yield rec["question"]
                    yield rec["answer"]


def _names(rng: random.Random, count: int) -> list[str]:
    seen, names = set(), []
    while len(names) < count:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(rng.choice((2, 3)))).capitalize()
        if word not in seen:
            seen.add(word)
            names.append(word)
    return names


def _facts(entity: dict) -> list[dict]:
    return [{"question": template.format(name=entity["name"]), "answer": entity[attr], "entity": entity["name"],
             "attribute": attr} for attr, (template, _) in ATTRIBUTES.items()]


def _general(rng: random.Random, count: int) -> list[dict]:
    out = []
    for _ in range(count):
        a1, a2 = rng.choice(_ADJ), rng.choice(_ADJ)
        n1, n2 = rng.sample(_NOUN, 2)
        out.append({"text": f"The {a1} {n1} {rng.choice(_VERB)} the {a2} {n2} {rng.choice(_PLACE)} ."})
    return out


def _arithmetic(rng: random.Random, count: int) -> list[dict]:
    out = []
    for _ in range(count):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        name = rng.choice(["Ann", "Bob", "Cara", "Dev"])
        item = rng.choice(["apples", "coins", "books", "stamps"])
        if rng.random() < 0.5:
            q, ans = f"{name} has {a} {item} and gets {b} more . How many {item} now ?", a + b
        else:
            a, b = max(a, b), min(a, b)
            q, ans = f"{name} has {a} {item} and gives away {b} . How many {item} now ?", a - b
        out.append({"question": q, "answer": str(ans)})
    return out


def _sentiment(rng: random.Random, count: int) -> list[dict]:
    out = []
    for _ in range(count):
        positive = rng.random() < 0.5
        word = rng.choice(_POS if positive else _NEG)
        q = f"Review : the {rng.choice(_THING)} was {word} . Is the review positive or negative ?"
        out.append({"question": q, "answer": "positive" if positive else "negative"})
    return out


def _paraphrase(rng: random.Random, count: int) -> list[dict]:
    out = []
    for _ in range(count):
        subject = rng.choice(_SUBJECTS)
        w1, w2 = rng.choice(_SYNONYMS)
        same = rng.random() < 0.5
        other = w2 if same else rng.choice([p[rng.randint(0, 1)] for p in _SYNONYMS if p != (w1, w2)])
        q = f"Do \" {subject} will {w1} \" and \" {subject} will {other} \" mean the same ?"
        out.append({"question": q, "answer": "yes" if same else "no"})
    return out


ENVIRONMENTS = {"arithmetic": _arithmetic, "sentiment": _sentiment, "paraphrase": _paraphrase}


def build_corpus(seed: int = 0, *, num_entities: int = 100, forget_entities: int = 20, general: int = 300,
                 utility: int = 60, env_train: int = 400, env_test: int = 60) -> Corpus:
    """The corpus of ``seed``: identical records for identical arguments."""
    for name, value in (("num_entities", num_entities), ("forget_entities", forget_entities)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if forget_entities >= num_entities:
        raise ValueError(f"forget_entities ({forget_entities}) must be < num_entities ({num_entities})")
    rng = random.Random(seed)
    entities = []
    for name in _names(rng, num_entities):
        # a unique given name plus a family name: the given name is the key of the facts
        entity = {"name": name}
        for attr, (_, pool) in ATTRIBUTES.items():
            entity[attr] = rng.choice(pool)
        entities.append(entity)
    family = _names(random.Random(seed + 7919), 12)
    for entity in entities:
        entity["name"] = f"{entity['name']} {rng.choice(family)}"
    forget = [f for e in entities[:forget_entities] for f in _facts(e)]
    retain = [f for e in entities[forget_entities:] for f in _facts(e)]
    sentences = _general(rng, general + utility)
    envs = {}
    for env_name, make in ENVIRONMENTS.items():
        records = make(rng, env_train + env_test)
        envs[env_name] = {"train": records[:env_train], "test": records[env_train:]}
    return Corpus(seed, entities, forget, retain, sentences[:general], sentences[general:], envs)
