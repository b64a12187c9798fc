"""Crash-safe checkpoints: safetensors for tensors, JSON for the rest, written aside and renamed.

OUTPUT/checkpoint-STEP/ holds
  model.safetensors      every model tensor (shared/tied tensors once)
  optimizer.safetensors  optimizer state tensors ("<param index>.<name>")
  extra.safetensors      RNG states, fp32 master weights, the weight average
  state.json             step, config, optimizer scalars and param groups, scheduler, data positions
A checkpoint is written into a temporary directory, flushed, then renamed: a
crash at any moment leaves the previous checkpoint whole (no pickle anywhere).
Sharded runs (FSDP) pass the gathered tensors (``model_tensors``, ``optimizer_state``)
and a function that cuts the loaded ones back into shards: the files are the same.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from .._files import replace_directory

PREFIX = "checkpoint-"


def optimizer_tensors(optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def restore_optimizer(optimizer, tensors: dict, meta: dict, to_local=None) -> None:
    """``to_local(param index, tensor)``: this process's part of a saved tensor (sharded parameters)."""
    state: dict = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = to_local(int(idx), value) if to_local else value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def restore_rng(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_checkpoint(output: Path, step: int, *, model, optimizer, scheduler, state: dict,
                    extra_tensors: dict | None = None, keep: int = 2, model_tensors: dict | None = None,
                    optimizer_state: tuple[dict, dict] | None = None) -> Path:
    """``model_tensors`` / ``optimizer_state`` (as ``optimizer_tensors`` returns it) replace what would be
    read from ``model`` / ``optimizer``: a sharded run passes them gathered."""
    output = Path(output)
    final = output / f"{PREFIX}{step}"
    with replace_directory(final, durable=True) as tmp:  # the same step saved again (a resumed run): replaced
        if model_tensors is None:
            save_model(model, str(tmp / "model.safetensors"))
        else:
            seen, unique = set(), {}
            for k, v in model_tensors.items():  # a tied weight once (safetensors refuses shared tensors)
                if id(v) not in seen:
                    seen.add(id(v))
                    unique[k] = v.detach().contiguous().cpu()
            save_file(unique, str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = optimizer_state or optimizer_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = rng_state()
        extra = {f"rng.{k}": v for k, v in rng_tensors.items()}
        extra.update({k: v.detach().contiguous().cpu() for k, v in (extra_tensors or {}).items()})
        save_file(extra, str(tmp / "extra.safetensors"))
        meta = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta, **state}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=_json_default))
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _json_default(value):
    if torch.is_tensor(value):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in state.json")


def list_checkpoints(output: Path) -> list[Path]:
    output = Path(output)
    if not output.exists():
        return []
    found = [p for p in output.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def load_checkpoint(path: Path, *, model, optimizer, scheduler, sharding=None) -> tuple[dict, dict]:
    """Restore model, optimizer, scheduler and RNG in place; return (state.json, extra tensors).

    ``sharding`` (``distributed.FSDPSharding``): load the full tensors into this process's shards.
    """
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    if sharding is None:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        if unexpected:
            raise ValueError(f"checkpoint {path} does not match the model: unexpected tensors {unexpected[:5]}")
    else:
        missing = sharding.load_full_state_dict(load_file(str(path / "model.safetensors")))
        if missing:
            raise ValueError(f"checkpoint {path} does not match the model: missing tensors {missing[:5]}")
    def shard_to_local(i, t):
        return sharding.shard(i, t) if t.shape == sharding.sharded[i].shape else t

    to_local = None if sharding is None else shard_to_local
    restore_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), meta["optimizer"], to_local)
    scheduler.load_state_dict(meta["scheduler"])
    extra = load_file(str(path / "extra.safetensors"))
    restore_rng({k[4:]: v for k, v in extra.items() if k.startswith("rng.")}, meta["rng"])
    return meta, {k: v for k, v in extra.items() if not k.startswith("rng.")}
