"""How far the C-AdvUL attack gets on the main job's default model, per signed-step size (the choice of
UnlearnSpec.adv_step_size): per-token ‖δ‖ against the radius (ε = 0.05 × mean embedding-row norm) and the
forget CE at the attacked embeddings, on the original model and on an NPO-unlearned copy.

    python bench/adv_step_size.py          # CPU, the default model from the cache (taught on first use)
"""
from __future__ import annotations

import copy
import time

import torch

import unlearn_fast as uf
from unlearn_fast.data.collate import collate
from unlearn_fast.data.corpus import build_corpus
from unlearn_fast.objectives.adversarial import embedding_radius, input_embeddings, prompt_mask
from unlearn_fast.recipes.run import Data, RunSpec, load_model, unlearn

STEP_SIZES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


@torch.no_grad()
def forget_ce(model, batch, delta) -> float:
    embeds = input_embeddings(model)(batch["input_ids"]) + delta
    logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   ignore_index=-100))


def main() -> None:
    torch.set_num_threads(1)
    spec = RunSpec()
    corpus = build_corpus(0, **spec.corpus)
    base, tokenizer, _ = load_model("default", corpus, spec, quick=False, seed=0)
    data = Data(corpus, tokenizer)
    hidden = input_embeddings(base).weight.shape[1]
    print(f"H={hidden}; a signed step of s moves a token by s·√H = {hidden ** 0.5:.2f}·s")
    batch = collate(data.forget_train[:16], data.pad, input_embeddings(base).weight.device)
    npo = copy.deepcopy(base)
    unlearn(npo, data, "npo", spec.unlearn, seed=0,
            ref_nll=uf.reference_nll(base, data.forget_train, pad_token_id=data.pad))
    mask = prompt_mask(batch["labels"], batch["attention_mask"])
    for name, model in (("original", base), ("npo", npo)):
        radius = embedding_radius(model, 0.05)
        print(f"{name}: radius {radius:.5f}, clean forget CE {forget_ce(model, batch, 0):.4f}")
        for step in STEP_SIZES:
            t0 = time.perf_counter()
            delta = uf.embedding_attack(model, batch["input_ids"], batch["labels"],
                                        attention_mask=batch["attention_mask"], eps=0.05, steps=10, step_size=step)
            seconds = time.perf_counter() - t0
            norms = delta.norm(dim=-1)[mask]
            print(f"  10 steps of {step:g}: token ‖δ‖ mean {float(norms.mean()) / radius:.2f} of the radius; "
                  f"attacked forget CE {forget_ce(model, batch, delta):.4f} ({seconds:.2f} s)")


if __name__ == "__main__":
    main()
