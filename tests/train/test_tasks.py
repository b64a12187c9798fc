"""The Trainer as the one loop: the fine-tuning task, in-memory runs, on_step, mixed streams."""
import copy

import torch

from unlearn_fast.data.collate import collate
from unlearn_fast.data.streams import BatchStream, MixedStream
from unlearn_fast.testing.tiny import tiny_llama
from unlearn_fast.train import Trainer, build_config
from tests.train.helpers import equal_length_examples


class Pad:
    pad_token_id = 0


def torch_adamw(params, config):
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def test_finetune_task_equals_a_hand_written_loop_on_the_same_batches(tmp_path):
    examples = equal_length_examples(3, 10)
    config = build_config({"task": "finetune", "lr": 1e-2, "max_steps": 4, "batch_size": 3, "warmup_ratio": 0,
                           "schedule": "constant", "clip": 1.0, "weight_decay": 0.01, "seed": 5})
    model = tiny_llama(layers=1, seed=2)
    reference = copy.deepcopy(model)
    Trainer(model, Pad(), config, data=examples, output_dir=None, progress=False, optimizer=torch_adamw).train()

    stream = BatchStream(examples, 3, seed=5)  # the batches the Trainer draws
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01)
    reference.train()
    for _ in range(4):
        batch = collate(stream.next_examples(), 0)
        loss = reference(**batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        opt.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(next(model.parameters()), next(tiny_llama(layers=1, seed=2).parameters()))


def test_in_memory_run_writes_nothing_and_on_step_can_end_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = []
    config = build_config({"task": "finetune", "lr": 1e-3, "max_steps": 10, "batch_size": 2, "save_every": 1})
    trainer = Trainer(tiny_llama(layers=1), Pad(), config, data=equal_length_examples(0, 6), output_dir=None,
                      progress=False, on_step=lambda step, metrics: seen.append((step, metrics["loss"])) or step == 3)
    trainer.train()
    assert [s for s, _ in seen] == [1, 2, 3] and trainer.step == 3
    assert list(tmp_path.iterdir()) == []  # no config, metrics, checkpoints or final model


def test_mixed_stream_takes_its_counts_from_each_source_and_resumes():
    a = [{"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1, 2])} for _ in range(5)]
    b = [{"input_ids": torch.tensor([3, 4, 5]), "labels": torch.tensor([3, 4, 5])} for _ in range(4)]
    stream = MixedStream([(a, 2), (b, 3)], seed=1)
    batch = stream.next_batch()
    assert batch["input_ids"].shape == (5, 3)
    assert (batch["attention_mask"].sum(1) == torch.tensor([2, 2, 3, 3, 3])).all()
    state = stream.state_dict()
    expected = stream.next_batch()
    again = MixedStream([(a, 2), (b, 3)], seed=1)
    again.load_state_dict(state)
    assert all(torch.equal(expected[k], again.next_batch()[k]) for k in expected)
