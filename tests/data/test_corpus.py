from unlearn_fast.data.corpus import ATTRIBUTES, build_corpus
from unlearn_fast.eval.metrics import encode_qa
from unlearn_fast.data.tokenizer import WordTokenizer

import pytest


def test_same_seed_identical_records():
    a, b = build_corpus(3), build_corpus(3)
    assert a.forget == b.forget and a.retain == b.retain and a.envs == b.envs
    assert a.general_train == b.general_train and a.utility == b.utility
    c = build_corpus(4)
    assert c.forget != a.forget


def test_splits_are_disjoint_by_entity():
    corpus = build_corpus(0, num_entities=30, forget_entities=6)
    forget_people = {r["entity"] for r in corpus.forget}
    retain_people = {r["entity"] for r in corpus.retain}
    assert len(forget_people) == 6 and len(retain_people) == 24
    assert not forget_people & retain_people
    assert len(corpus.forget) == 6 * len(ATTRIBUTES)
    names = [e["name"] for e in corpus.entities]
    assert len(set(n.split()[0] for n in names)) == len(names)  # given names are unique keys
    for env in corpus.envs.values():
        assert env["train"] and env["test"]


def test_environment_answers_are_right():
    corpus = build_corpus(1, env_train=50, env_test=10)
    for rec in corpus.envs["arithmetic"]["train"]:
        words = rec["question"].split()
        a, b = int(words[2]), int(words[6] if "gets" in words else words[7])
        assert int(rec["answer"]) == (a + b if "gets" in words else a - b)
    for rec in corpus.envs["sentiment"]["train"]:
        assert rec["answer"] in ("positive", "negative")


def test_bad_arguments():
    with pytest.raises(ValueError, match="forget_entities"):
        build_corpus(0, num_entities=5, forget_entities=5)


def test_tokenizer_roundtrip_and_qa_labels():
    corpus = build_corpus(0, num_entities=10, forget_entities=2)
    tok = WordTokenizer.from_texts(corpus.all_texts())
    assert WordTokenizer.from_texts(build_corpus(0, num_entities=10, forget_entities=2).all_texts()).vocab == tok.vocab
    rec = corpus.forget[0]
    assert tok.decode(tok.encode(rec["question"])) == rec["question"]
    assert tok.encode("zzzunknownzzz", add_special_tokens=False) == [tok.unk_token_id]
    ex = encode_qa([rec], tok)[0]
    answer = tok.encode(rec["answer"], add_special_tokens=False) + [tok.eos_token_id]
    n = len(answer)
    assert ex["labels"][-n:].tolist() == answer
    assert (ex["labels"][:-n] == -100).all()
    assert ex["input_ids"][0] == tok.bos_token_id
    probe = encode_qa([rec], tok, eos=False)[0]
    assert probe["labels"][-1] != tok.eos_token_id


def test_tokenizer_save_load(tmp_path):
    tok = WordTokenizer.from_texts(["a b c", "d e ."])
    tok.save_pretrained(tmp_path)
    assert WordTokenizer.from_pretrained(tmp_path).vocab == tok.vocab
