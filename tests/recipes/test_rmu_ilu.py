"""rmu+ilu (the ILU paper's largest effect): RMU's objective with the IRM penalty over the environments."""
import copy

import torch

from unlearn_fast.data.corpus import build_corpus
from unlearn_fast.recipes.teach import QUICK_MODEL, build_model
from unlearn_fast.recipes.run import ALL_METHODS, Data, UnlearnSpec, method_config, unlearn
from unlearn_fast.data.tokenizer import WordTokenizer


def test_rmu_ilu_config():
    spec = UnlearnSpec(irm_weight=0.7)
    config, lr = method_config("rmu+ilu", spec, num_layers=4, seed=1)
    plain, plain_lr = method_config("rmu", spec, num_layers=4, seed=1)
    assert "rmu+ilu" in ALL_METHODS
    assert (config.method, config.irm, config.irm_weight) == ("rmu", "logit", 0.7)
    assert (config.rmu_layer, config.rmu_steering, lr) == (plain.rmu_layer, plain.rmu_steering, plain_lr)
    assert plain.irm is None


def test_rmu_ilu_step_differs_from_rmu_only_by_the_penalty():
    corpus = build_corpus(0, num_entities=8, forget_entities=2, general=10, utility=4, env_train=8, env_test=4)
    tokenizer = WordTokenizer.from_texts(corpus.all_texts())
    data = Data(corpus, tokenizer)
    base = build_model(QUICK_MODEL, len(tokenizer), seed=0)
    spec = UnlearnSpec(steps=2, batch_size=4, env_batch_size=4, irm_weight=5.0)
    rmu, ilu = copy.deepcopy(base), copy.deepcopy(base)
    terms_rmu = unlearn(rmu, data, "rmu", spec, seed=0)
    terms_ilu = unlearn(ilu, data, "rmu+ilu", spec, seed=0)
    assert "irm_penalty" in terms_ilu and "irm_penalty" not in terms_rmu
    changed = [n for (n, a), b in zip(rmu.named_parameters(), ilu.parameters()) if not torch.equal(a, b)]
    # the same trainable slice (RMU's down_proj weights) moves, differently because of the penalty
    assert changed and all("mlp.down_proj" in n for n in changed)
