"""GGUF -> Hugging Face conversion (the --model smollm2 path) on a tiny GGUF file the test writes itself."""
import json

import numpy as np
import pytest
import torch

from unlearn_fast.recipes.teach import drop_gguf_quantizer, load_directory, load_gguf

gguf = pytest.importorskip("gguf")

H, FF, LAYERS, HEADS, KV_HEADS = 16, 24, 2, 4, 2
TOKENS = ["<unk>", "<s>", "</s>", "▁", "a", "b", "c", "▁a", "▁b", "▁c", "▁ab", "▁abc"]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """How llama.cpp's converter reorders Q/K rows for its rotary layout (convert_hf_to_gguf.py's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_llama(path):
    """A 2-layer llama GGUF with random fp32 weights and a 12-token SentencePiece-style vocabulary.

    Returns the Hugging Face state dict the file stands for (Q/K in Hugging Face order)."""
    rng = np.random.default_rng(0)
    head_dim = H // HEADS

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    hf = {"model.embed_tokens.weight": rand(len(TOKENS), H), "model.norm.weight": 1 + rand(H),
          "lm_head.weight": rand(len(TOKENS), H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        hf.update({p + "self_attn.q_proj.weight": rand(HEADS * head_dim, H),
                   p + "self_attn.k_proj.weight": rand(KV_HEADS * head_dim, H),
                   p + "self_attn.v_proj.weight": rand(KV_HEADS * head_dim, H),
                   p + "self_attn.o_proj.weight": rand(H, HEADS * head_dim),
                   p + "mlp.gate_proj.weight": rand(FF, H), p + "mlp.up_proj.weight": rand(FF, H),
                   p + "mlp.down_proj.weight": rand(H, FF),
                   p + "input_layernorm.weight": 1 + rand(H), p + "post_attention_layernorm.weight": 1 + rand(H)})
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(H)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(TOKENS))
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores([0.0, 0.0, 0.0] + [-float(i) for i in range(len(TOKENS) - 3)])
    w.add_token_types([2, 3, 3] + [1] * (len(TOKENS) - 3))  # unknown, control, control, normal...
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", hf["model.norm.weight"])
    w.add_tensor("output.weight", hf["lm_head.weight"])
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _llama_cpp_permute(hf[p + "self_attn.q_proj.weight"], HEADS))
        w.add_tensor(f"blk.{i}.attn_k.weight", _llama_cpp_permute(hf[p + "self_attn.k_proj.weight"], KV_HEADS))
        for hf_name, gguf_name in names.items():
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", hf[p + hf_name + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, _write_tiny_llama(path)


def test_gguf_to_hugging_face_weights_equal_what_was_written(tiny_gguf):
    path, hf = tiny_gguf
    model, tokenizer = load_gguf(path)
    assert model.config.num_hidden_layers == LAYERS and model.config.num_key_value_heads == KV_HEADS
    state = model.state_dict()
    assert set(hf) <= set(state)
    for name, value in hf.items():
        assert torch.equal(state[name], torch.from_numpy(value)), name  # Q/K un-permuted back, bit for bit
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert tokenizer.convert_tokens_to_ids("▁abc") == TOKENS.index("▁abc")
    assert tokenizer.pad_token_id is not None


def test_gguf_model_saves_reloads_and_trains(tiny_gguf, tmp_path):
    path, hf = tiny_gguf
    model, tokenizer = load_gguf(path)
    model.save_pretrained(tmp_path, safe_serialization=True)  # raised "quantized with gguf" before the fix
    tokenizer.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    again, _ = load_directory(tmp_path)
    ids = torch.tensor([[1, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    before = again.lm_head.weight.detach().clone()
    opt = torch.optim.SGD(again.parameters(), lr=0.1)
    again.train()
    again(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.equal(again.lm_head.weight, before)


def test_saving_with_the_gguf_quantizer_kept_fails_and_drop_fixes_it(tiny_gguf, tmp_path):
    """The bug itself: transformers' own GGUF load keeps the quantizer and cannot save."""
    from transformers import AutoModelForCausalLM

    path, _ = tiny_gguf
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "kept")
    drop_gguf_quantizer(model)
    model.save_pretrained(tmp_path / "dropped")
    assert (tmp_path / "dropped" / "model.safetensors").exists()


def test_missing_paths_are_reported_as_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_directory(tmp_path / "no" / "such" / "model")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_directory(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gguf(tmp_path / "absent.gguf")
