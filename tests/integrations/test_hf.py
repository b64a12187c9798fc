"""HF integration: the patched forward's loss and gradients against the unpatched model; the Trainer mixin's
gradient against uf.unlearning_gradients on the same batch and weights."""
import copy

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.testing.tiny import make_batch, tiny_llama
from unlearn_fast.integrations import hf


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie", [False, True])
def test_apply_matches_the_unpatched_loss_and_gradients(tie):
    model = tiny_llama(tie=tie, layers=2)
    batch = make_batch(3)
    out = model(**batch)
    out.loss.backward()
    expected_loss, expected_grads, expected_logits = out.loss.detach(), grads(model), out.logits.detach()
    model.zero_grad(set_to_none=True)

    handle = hf.apply(model)
    assert hf.is_applied(model)
    patched = model(**batch)
    assert patched.logits is None  # nothing [N, V] materialised when only the loss is asked for
    patched.loss.backward()
    torch.testing.assert_close(patched.loss.detach(), expected_loss, rtol=1e-5, atol=1e-6)
    got = grads(model)
    assert got.keys() == expected_grads.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    # without labels the model's own forward runs: logits as before
    torch.testing.assert_close(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               expected_logits)
    handle.remove()
    assert not hf.is_applied(model) and "forward" not in model.__dict__
    torch.testing.assert_close(model(**batch).logits, expected_logits)


def test_num_items_in_batch_and_keep_logits():
    model = tiny_llama(layers=1)
    batch = make_batch(5)
    reference = model(**batch, num_items_in_batch=torch.tensor(40))
    with hf.apply(model, keep_logits=True):
        patched = model(**batch, num_items_in_batch=torch.tensor(40))
    torch.testing.assert_close(patched.loss, reference.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(patched.logits, reference.logits)
    assert not hf.is_applied(model)
    with pytest.raises(RuntimeError, match="not patched"):
        hf.remove(model)


def examples(seed, n, length=10, prompt=3):
    """Equal-length examples (so batch means are comparable): 1-D input_ids, labels with a masked prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 97, (length,), generator=g)
        labels = ids.clone()
        labels[:prompt] = -100
        out.append({"input_ids": ids, "labels": labels, "index": i})
    return out


def test_trainer_mixin_step_gradient_is_unlearning_gradients(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    config = uf.UnlearnConfig(method="graddiff", sam_rho=0.05, irm="logit", irm_weight=0.5, retain_weight=0.7)
    model = tiny_llama(layers=2)
    seen = []

    class Recording(hf.UnlearnTrainerMixin, Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen.append({"inputs": inputs, "weights": copy.deepcopy(self.accelerator.unwrap_model(model))})
            return super().training_step(model, inputs, num_items_in_batch)

    class CompareGradients(TrainerCallback):
        checked = 0

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            reference = seen[-1]["weights"]  # the weights this step's gradient was taken at
            inputs = seen[-1]["inputs"]
            uf.unlearning_gradients(reference, inputs["forget"], inputs.get("retain"), inputs["envs"], config)
            expected = grads(reference)
            got = grads(model)
            assert got.keys() == expected.keys()
            for name in got:
                torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
            CompareGradients.checked += 1

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                             learning_rate=1e-3, max_grad_norm=0.0, use_cpu=True, report_to=[],
                             save_strategy="no", logging_steps=1, dataloader_num_workers=0, seed=0)
    data = hf.UnlearnDataset(examples(0, 6), examples(1, 6), [examples(2, 6)])
    trainer = Recording(model=model, args=args, train_dataset=data, data_collator=hf.UnlearnCollator(0),
                        unlearn_config=config, callbacks=[CompareGradients()])
    before = copy.deepcopy(model.state_dict())
    trainer.train()
    assert CompareGradients.checked == 2
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it did train
    logged = [r for r in trainer.state.log_history if "uf_sam_norm" in r]
    assert logged and all(r["uf_irm_penalty"] >= 0 for r in logged)


def test_apply_on_a_peft_model_patches_the_base_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(layers=1), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    batch = make_batch(7)
    expected = model(**batch).loss
    with hf.apply(model):
        patched = model(**batch)
    assert patched.logits is None
    torch.testing.assert_close(patched.loss, expected, rtol=1e-5, atol=1e-6)


def test_collator_pads_each_set_and_stacks_ref_nll():
    forget = examples(0, 3, length=6) + examples(1, 1, length=9)
    data = hf.UnlearnDataset(forget, examples(2, 2, length=5), [examples(3, 3, length=4)],
                             ref_nll=torch.arange(4.0))
    batch = hf.UnlearnCollator(pad_token_id=0)([data[i] for i in range(4)])
    assert batch["forget"]["input_ids"].shape == (4, 9) and batch["forget"]["attention_mask"][0].sum() == 6
    assert batch["forget"]["labels"][0, 6:].eq(-100).all()
    torch.testing.assert_close(batch["forget"]["ref_nll"], torch.arange(4.0))
    assert batch["retain"]["input_ids"].shape == (4, 5) and len(batch["envs"]) == 1
    with pytest.raises(ValueError, match="ref_nll: needs one value per forget example"):
        hf.UnlearnDataset(forget, ref_nll=torch.zeros(2))
