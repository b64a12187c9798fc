"""Benchmark record shapes: the synthetic corpus's export, the file formats read, and the checks on bad data."""
import json

import pytest

from unlearn_fast.data.benchmarks import (
    MuseData,
    TofuData,
    WmdpData,
    check_records,
    find_split,
    hf_records,
    load_benchmark,
    read_meta,
    read_records,
)
from unlearn_fast.data.benchmark_corpus import export_benchmark
from unlearn_fast.data.corpus import build_corpus
from unlearn_fast.data.tokenizer import WordTokenizer


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(3, num_entities=10, forget_entities=3, general=12, utility=4, env_train=4, env_test=6)


def test_tofu_export_has_the_tofu_shapes(corpus, tmp_path):
    data = load_benchmark("tofu", export_benchmark(corpus, "tofu", tmp_path))
    assert isinstance(data, TofuData)
    assert len(data.forget) == len(corpus.forget) and len(data.retain) == len(corpus.retain)
    tokenizer = WordTokenizer.from_texts(corpus.all_texts())
    for rec, fact in zip(data.forget, corpus.forget):
        assert rec["question"] == fact["question"] and rec["answer"] == fact["answer"]
        assert rec["paraphrased_answer"].split()[-1] == rec["answer"] != rec["paraphrased_answer"]
        assert len(rec["perturbed_answer"]) == 3 and rec["paraphrased_answer"] not in rec["perturbed_answer"]
        assert len(set(rec["perturbed_answer"])) == 3
        for text in [rec["paraphrased_answer"], *rec["perturbed_answer"]]:  # only words the corpus has
            assert tokenizer.unk_token_id not in tokenizer.encode(text, add_special_tokens=False), text
    people = {f["entity"] for f in corpus.forget + corpus.retain}
    assert data.holdout and not any(p in r["question"] for r in data.holdout for p in people)
    for rec in data.holdout:  # the answers are words the model knows: only the pairing is new
        assert tokenizer.unk_token_id not in tokenizer.encode(rec["answer"], add_special_tokens=False)
    for rec in data.world_facts:
        assert rec["answer"] not in rec["perturbed_answer"] and all(a.isdigit() for a in rec["perturbed_answer"])
    assert {r["perturbed_answer"][0] for r in data.real_authors} <= {"positive", "negative"}
    assert read_meta(tmp_path)["mc_format"] == "text"


def test_muse_and_wmdp_exports(corpus, tmp_path):
    muse = load_benchmark("muse", export_benchmark(corpus, "muse", tmp_path / "muse"))
    assert isinstance(muse, MuseData)
    assert [r["question"] for r in muse.forget_knowmem] == [f["question"] for f in corpus.forget]
    assert muse.verbmem[0] == {"prompt": corpus.forget[0]["question"], "gt": corpus.forget[0]["answer"]}
    assert len(muse.forget_text) == len(corpus.forget) and len(muse.retain_text) == len(corpus.retain)
    assert len(muse.holdout_text) > 0
    wmdp = load_benchmark("wmdp", export_benchmark(corpus, "wmdp", tmp_path / "wmdp"))
    assert isinstance(wmdp, WmdpData) and set(wmdp.questions) == {"wmdp-bio", "mmlu"}
    tokenizer = WordTokenizer.from_texts(corpus.all_texts())
    for rec, fact in zip(wmdp.questions["wmdp-bio"], corpus.forget):
        assert len(set(rec["choices"])) == 4 and rec["choices"][rec["answer"]] == fact["answer"]
        assert tokenizer.unk_token_id not in tokenizer.encode(" ".join(rec["choices"]), add_special_tokens=False)
    assert wmdp.retain_corpus == corpus.general_train
    with pytest.raises(ValueError, match="name"):
        export_benchmark(corpus, "mmlu", tmp_path)


def test_file_formats(tmp_path):
    recs = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    (tmp_path / "list.json").write_text(json.dumps(recs))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in recs))  # TOFU's .json files
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    for name in ("list.json", "lines.json", "lines.jsonl"):
        assert read_records(tmp_path / name) == recs
    (tmp_path / "bad.jsonl").write_text('{"question": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_records(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "missing.jsonl")


def test_parquet_shards_in_hugging_face_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    qa = [{"question": "Who ?", "answer": "me"}]
    text = [{"text": "some words"}, {"text": "other words"}]
    (tmp_path / "knowmem").mkdir()
    (tmp_path / "privleak").mkdir()
    pq.write_table(pa.Table.from_pylist(qa), tmp_path / "knowmem" / "forget_qa-00000-of-00001.parquet")
    for split in ("forget", "holdout"):
        pq.write_table(pa.Table.from_pylist(text), tmp_path / "privleak" / f"{split}-00000-of-00001.parquet")
    data = load_benchmark("muse", tmp_path)
    assert data.forget_knowmem == qa and data.holdout_text == text and data.verbmem is None
    pq.write_table(pa.Table.from_pylist(qa), tmp_path / "knowmem" / "forget_qa-00001-of-00002.parquet")
    with pytest.raises(ValueError, match="shards"):
        find_split(tmp_path, ["knowmem/forget_qa"])


def test_bad_records_are_named():
    with pytest.raises(ValueError, match="lacks \\['paraphrased_answer'\\]"):
        check_records([{"question": "q", "answer": "a", "perturbed_answer": ["b"]}],
                      ("question", "answer", "paraphrased_answer", "perturbed_answer"), "f.json")
    with pytest.raises(ValueError, match="list of strings"):
        check_records([{"question": "q", "answer": "a", "perturbed_answer": "b"}],
                      ("question", "answer", "perturbed_answer"), "f.json")
    with pytest.raises(ValueError, match="index into its 2 choices"):
        check_records([{"question": "q", "choices": ["a", "b"], "answer": 2}], ("question", "choices", "answer"), "x")
    with pytest.raises(ValueError, match="no records"):
        check_records([], ("text",), "x")


def test_missing_splits_and_names(tmp_path):
    with pytest.raises(ValueError, match="name"):
        load_benchmark("tofu2", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_benchmark("tofu", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="'forget'"):
        load_benchmark("tofu", tmp_path)
    with pytest.raises(FileNotFoundError, match="multiple-choice"):
        load_benchmark("wmdp", tmp_path)


def test_hf_records_reads_a_local_dataset_offline(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"text": "c"}) + "\n")
    assert hf_records(str(folder), None, "train") == [{"text": "a b"}, {"text": "c"}]
    with pytest.raises(FileNotFoundError, match="not in the local"):
        hf_records("no-such-org/no-such-dataset-18", None, "train")
