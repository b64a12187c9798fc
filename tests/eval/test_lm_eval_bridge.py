"""The lm-evaluation-harness bridge, run for real on a local task, against the project's own MC metric."""
import json

import pytest
import torch

from unlearn_fast.testing.tiny import tiny_llama
from unlearn_fast.eval.multiple_choice import multiple_choice_accuracy

pytest.importorskip("lm_eval")

WORDS = ["Where", "was", "Ann", "Bob", "born", "?", "Which", "pet", "does", "keep", "Dunmere", "Calvast", "Ostrel",
         "Quenby", "parrot", "goat", "owl", "pony", "the", "in", "What", "do", "for", "a", "living", "baker", "pilot",
         "poet", "lawyer"]
ITEMS = [
    {"question": "Where was Ann born ?", "choices": ["Dunmere", "Calvast", "Ostrel", "Quenby"], "answer": 1},
    {"question": "Which pet does Bob keep ?", "choices": ["parrot", "goat", "owl", "pony"], "answer": 3},
    {"question": "What does Ann do for a living ?", "choices": ["baker", "pilot", "poet", "lawyer"], "answer": 0},
    {"question": "Where was Bob born ?", "choices": ["in Ostrel", "in Quenby", "in Dunmere", "in Calvast"],
     "answer": 2},
    {"question": "Which pet does Ann keep ?", "choices": ["owl", "parrot", "a goat", "pony"], "answer": 1},
    {"question": "What does Bob do for a living ?", "choices": ["poet", "lawyer", "a baker", "pilot"], "answer": 3},
]


def word_level_hf_tokenizer():
    """A Hugging Face fast tokenizer over a word vocabulary, built in code (HFLM needs an HF tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"] + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_local_yaml_task_through_the_bridge_matches_the_projects_metric(tmp_path, monkeypatch):
    from unlearn_fast.eval.lm_eval_bridge import lm_eval_bridge

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "uf_local_mc.yaml").write_text(
        "task: uf_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    tokenizer = word_level_hf_tokenizer()
    model = tiny_llama(vocab=len(tokenizer), layers=2, seed=3).eval()

    out = lm_eval_bridge(model, tokenizer, ["uf_local_mc"], include_path=tasks, batch_size=4, log_samples=True,
                         include_defaults=False)
    ours = multiple_choice_accuracy(model, tokenizer, ITEMS, fmt="text", batch_size=5)

    samples = sorted(out["samples"]["uf_local_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(ITEMS)
    theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    assert torch.allclose(torch.tensor(theirs, dtype=torch.float64),
                          torch.tensor(ours["loglikelihoods"], dtype=torch.float64), rtol=1e-4, atol=1e-4)
    results = out["results"]["uf_local_mc"]
    assert results["acc,none"] == pytest.approx(ours["acc"])
    assert results["acc_norm,none"] == pytest.approx(ours["acc_norm"])
