"""The thin trainer, the package's ONE training loop: a readable loop over ``unlearning_gradients``
(task "unlearn") or the plain fine-tuning objective (task "finetune": teaching, relearning and
fine-tuning attacks), on disk (checkpoints, metrics, final model) or in memory (``output_dir=None``).

    for step in 1..max_steps:
        for each micro-batch: unlearning_gradients(model, forget, retain, envs)   # accumulates .grad
        average .grad over micro-batches (and processes), stop on a non-finite loss
        clip, optimizer step, scheduler step, weight average, log, checkpoint

Under ``torchrun`` the processes split every batch (``parallel: ddp``: replicated
weights; ``parallel: fsdp``: FSDP2, weights sharded between steps; see
``distributed``). Resuming from OUTPUT/checkpoint-STEP restores weights, optimizer, scheduler, RNG
and data positions, so a killed and resumed run ends bit-identical to an
uninterrupted one (CPU).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from .. import ops, optim
from .._files import replace_directory
from ..optim.averaging import WeightAverager
from ..objectives.lm import trainable_parameters
from ..objectives.reference_nll import reference_nll
from ..objectives.finetune import finetune_gradients
from ..objectives.step import unlearning_gradients
from .checkpoint import list_checkpoints, load_checkpoint, optimizer_tensors, save_checkpoint
from .config import TrainConfig
from ..data.streams import BatchStream
from .distributed import broadcast_parameters, data_parallel, is_distributed, shard_model


class NonFiniteLoss(RuntimeError):
    pass


def lr_lambda(config: TrainConfig):
    warmup = int(config.warmup_ratio * config.max_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        return max(config.min_lr_ratio, (config.max_steps - step) / max(1, config.max_steps - warmup))

    return factor


def distributed() -> bool:
    return is_distributed()


def adamw(params, config: TrainConfig):
    """The default optimizer: the fused multi-tensor AdamW (one pass over all parameters, torch AdamW's
    state layout); ``Trainer(optimizer=...)`` takes any ``(params, config) -> Optimizer``."""
    return optim.FusedAdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def apply_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on ``lora_targets`` (only the adapters train)."""
    try:
        import peft
    except ImportError:
        raise ImportError("lora_r > 0 needs the 'peft' package: pip install peft") from None
    lora = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=list(config.lora_targets),
                           lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lora)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward; non-reentrant so that ``torch.autograd.grad`` (SAM, GP) works."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(base, "gradient_checkpointing_enable"):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"gradient_checkpointing: {type(base).__name__} has no activation_checkpointing_enable()")


class MasterWeights:
    """fp32 master copies of bf16 weights: the optimizer steps the masters, the model gets them rounded."""

    def __init__(self, params):
        self.params = list(params)
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]

    @torch.no_grad()
    def grads_to_masters(self):
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()

    @torch.no_grad()
    def masters_to_model(self):
        for p, m in zip(self.params, self.masters):
            p.copy_(m)


class Trainer:
    """Robust unlearning of a causal LM: forget/retain/environment examples in, checkpoints and metrics out."""

    def __init__(self, model: nn.Module, tokenizer, config: TrainConfig, *, forget=None, retain=None, envs=(),
                 data=None, output_dir="runs/train", ref_model=None, progress: bool = True, optimizer=None,
                 ref_nll=None, on_step=None):
        """``forget``/``retain``/``envs``: example lists (task "unlearn"); ``data``: the examples, or a
        stream (``data.MixedStream``), that task "finetune" trains on. ``output_dir=None``: an in-memory
        run that writes nothing (no config, metrics, checkpoints or final model). ``ref_nll``: NPO's
        reference NLL of the forget examples, if already computed. ``on_step(step, metrics)`` runs after
        every optimizer step (model in eval mode); returning True ends the run there."""
        if config.task == "finetune":
            if data is None or forget is not None:
                raise ValueError("task finetune: give the training examples as data=..., not forget=")
        elif forget is None:
            raise ValueError("forget: the unlearning task needs forget examples")
        if config.lora_r > 0 and not hasattr(model, "peft_config"):
            model = apply_lora(model, config)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.output = Path(output_dir) if output_dir is not None else None
        self.ref_model = ref_model
        self.on_step = on_step
        self.progress = progress
        self.device = next(model.parameters()).device
        self.rank = torch.distributed.get_rank() if distributed() else 0
        self.world = torch.distributed.get_world_size() if distributed() else 1
        pad = getattr(tokenizer, "pad_token_id", None) or 0
        seed, split = config.seed, dict(rank=self.rank, world=self.world)
        if config.task == "finetune":  # the data's stream takes the first place: "forget" is just its slot
            self.forget = data if hasattr(data, "next_batch") else BatchStream(data, config.batch_size, seed, pad,
                                                                                **split)
        else:
            self.forget = BatchStream(forget, config.batch_size, seed, pad, **split)
        self.retain = BatchStream(retain, config.batch_size, seed + 1, pad, **split) if retain else None
        env_batch = config.env_batch_size or config.batch_size
        self.envs = [BatchStream(e, env_batch, seed + 2 + i, pad, **split) for i, e in enumerate(envs)]
        self.objective = config.unlearn
        if self.objective.irm and not envs:
            raise ValueError("envs: irm needs at least one environment (fine-tuning data set)")
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if self.world > 1:  # every process starts from rank 0's weights
            broadcast_parameters(model)
        self.architecture = type(model).__name__  # before FSDP renames the class
        self.sharding = None
        if self.world > 1 and config.parallel == "fsdp":
            self.sharding = shard_model(model, layerwise=self.objective.backward_only)
        # the optimizer's parameters: the model's own, or under FSDP this process's shards of them
        self.params = self.sharding.local_params if self.sharding else trainable_parameters(model)
        self.master = MasterWeights(self.params) if config.master_weights else None
        opt_params = self.master.masters if self.master else self.params
        self.optimizer = (optimizer or adamw)(opt_params, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.averager = WeightAverager(model, start=config.wa_start, every=config.wa_every) if config.wa_start >= 0 else None
        self.ref_nll = ref_nll
        self.step = 0

    # -- setup ---------------------------------------------------------------------------------
    def _gathered(self):
        """Full weights on every process for the block (FSDP); nothing to do otherwise."""
        return self.sharding.gathered() if self.sharding else contextlib.nullcontext()

    def _reference_nll(self):
        if self.config.task == "unlearn" and self.objective.needs_ref_nll and self.ref_nll is None:
            cache = self.output / "ref_nll" if self.rank == 0 and self.output else None  # one writer; others recompute
            if self.sharding:  # the cache key reads model.state_dict(), which FSDP answers by resharding
                cache = None
            with self._gathered():
                self.ref_nll = reference_nll(self.model, self.forget.examples, batch_size=self.config.batch_size,
                                         cache_dir=cache, pad_token_id=self.forget.pad)

    def _resume(self) -> None:
        found = list_checkpoints(self.output) if self.output is not None else []
        if not found:
            return
        meta, extra = load_checkpoint(found[-1], model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                      sharding=self.sharding)
        self.step = meta["step"]
        for stream, state in zip(self._streams(), meta["streams"]):
            stream.load_state_dict(state)
        if self.master:
            for i, m in enumerate(self.master.masters):
                saved = extra[f"master.{i}"]
                m.data.copy_(self.sharding.shard(i, saved) if self.sharding else saved)
        if self.averager and meta.get("averager"):
            self.averager.count = meta["averager"]["count"]
            self.averager.average = {k[3:]: v for k, v in extra.items() if k.startswith("wa.")}
        self._log({"event": "resumed", "step": self.step, "checkpoint": str(found[-1])})

    def _streams(self):
        return [s for s in (self.forget, self.retain, *self.envs) if s is not None]

    # -- the loop ------------------------------------------------------------------------------
    def train(self, *, resume: bool = False) -> dict:
        if self.output is not None:
            self.output.mkdir(parents=True, exist_ok=True)
        if self.rank == 0 and self.output is not None:
            (self.output / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1))
        self._reference_nll()
        if resume:
            self._resume()
        self.model.train()
        bar = self._bar()
        last = {}
        while self.step < self.config.max_steps:
            start = time.perf_counter()
            last, tokens = self._accumulate()
            self._check_finite(last)
            last["grad_norm"] = self._clip()
            if self.master:
                self.master.grads_to_masters()
            self.optimizer.step()
            if self.master:
                self.master.masters_to_model()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.model.zero_grad(set_to_none=True)
            for p in self.params:  # FSDP's local shards are not the model's parameters (bf16 + masters: not the optimizer's)
                p.grad = None
            self.step += 1
            if self.averager:
                self.averager.update(self.model, self.step)
            last.update(step=self.step, lr=self.scheduler.get_last_lr()[0],
                        tokens_per_s=tokens / max(time.perf_counter() - start, 1e-9))
            if self.step % self.config.log_every == 0 or self.step == self.config.max_steps:
                self._log(last)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4g}", penalty=f"{last.get('irm_penalty', 0):.3g}",
                                tok_s=f"{last['tokens_per_s']:.0f}")
            if self.on_step is not None:
                self.model.eval()
                stop = self.on_step(self.step, last)
                self.model.train()
                if stop:
                    break
            if self.step % self.config.save_every == 0 and self.step < self.config.max_steps:
                self.save()
        if bar is not None:
            bar.close()
        if self.averager and self.averager.count:
            self.averager.copy_to(self.model)
        self.model.eval()
        self.save_final()
        return last

    def _accumulate(self) -> tuple[dict, int]:
        totals: dict = {}
        tokens = 0
        # ``averaged``: the parameters whose gradients the hooks average over processes as autograd makes
        # them (None: FSDP reduce-scatters them itself); under FSDP the shards' .grad are set on leaving
        with self.sharding.step() if self.sharding else contextlib.nullcontext(self.params) as averaged:
            average = contextlib.nullcontext if averaged is None else lambda: data_parallel(averaged)
            for micro in range(self.config.grad_accum):
                forget = self.forget.next_batch(self.device, extra={"ref_nll": self.ref_nll} if self.ref_nll is not None else None)
                retain = self.retain.next_batch(self.device) if self.retain else None
                envs = [e.next_batch(self.device) for e in self.envs]
                with average():
                    if self.config.task == "finetune":
                        metrics = finetune_gradients(self.model, forget)
                    else:
                        metrics = unlearning_gradients(self.model, forget, retain, envs, self.objective,
                                                       ref_model=self.ref_model,
                                                       step=self.step * self.config.grad_accum + micro)
                tokens += sum(int(b["attention_mask"].sum()) for b in [forget, retain, *envs] if b is not None)
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v / self.config.grad_accum
        with torch.no_grad():
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.mul_(1.0 / self.config.grad_accum)
        if self.world > 1:  # report the global mean of every metric (and stop on every process together)
            keys = sorted(k for k, v in totals.items() if isinstance(v, float))
            values = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
            torch.distributed.all_reduce(values)
            totals.update(zip(keys, (values / self.world).tolist()))
        return totals, tokens * self.world

    def _check_finite(self, metrics: dict) -> None:
        bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            checkpoints = list_checkpoints(self.output) if self.output is not None else []
            where = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
            raise NonFiniteLoss(f"non-finite {', '.join(bad)} at step {self.step + 1}: stopping; {where}")

    def _clip(self) -> float:
        if self.sharding:  # sharded gradients: the multi-tensor norm all-reduces the squared norm over processes
            grads = [p.grad for p in self.params]
            norm = ops.global_grad_norm(grads)
            if self.config.clip > 0:  # as torch.nn.utils.clip_grad_norm_
                torch._foreach_mul_(grads, torch.clamp(self.config.clip / (norm + 1e-6), max=1.0))
        elif self.config.clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in self.params]))
        return float(norm)

    # -- output --------------------------------------------------------------------------------
    def _gather_for_save(self) -> dict:
        """FSDP: full model, optimizer state and master weights (collectives: every process calls this)."""
        if not self.sharding:
            return {}
        tensors, meta = optimizer_tensors(self.optimizer)
        for key in sorted(tensors):  # the same order on every process
            i = int(key.split(".", 1)[0])
            if tensors[key].dim() > 0 and tensors[key].shape == self.params[i].shape:
                tensors[key] = self.sharding.full(i, tensors[key])
        masters = [self.sharding.full(i, m) for i, m in enumerate(self.master.masters)] if self.master else []
        return dict(model_tensors=self.sharding.full_state_dict(), optimizer_state=(tensors, meta), masters=masters)

    def save(self) -> Path | None:
        if self.output is None:  # an in-memory run
            return None
        gathered = self._gather_for_save()
        masters = gathered.pop("masters", None)
        if self.rank != 0:
            return self._barrier()
        extra = {}
        if self.master:
            masters = masters or [m.detach() for m in self.master.masters]
            extra.update({f"master.{i}": m for i, m in enumerate(masters)})
        state = {"streams": [s.state_dict() for s in self._streams()], "config": self.config.to_dict()}
        if self.averager:
            extra.update({f"wa.{k}": v for k, v in self.averager.average.items()})
            state["averager"] = {"count": self.averager.count}
        path = save_checkpoint(self.output, self.step, model=self.model, optimizer=self.optimizer,
                               scheduler=self.scheduler, state=state, extra_tensors=extra,
                               keep=self.config.keep_checkpoints, **gathered)
        self._barrier()
        return path

    def _barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def save_final(self) -> Path | None:
        """OUTPUT/final: the model in Hugging Face format (LoRA: merged into the base, adapters in final/adapter)."""
        if self.output is None:
            return None
        full = self.sharding.full_state_dict() if self.sharding else None  # FSDP: every process gathers
        if self.rank != 0:
            return self._barrier()
        final = self.output / "final"
        model = self.model
        with replace_directory(final) as tmp:
            if hasattr(model, "merge_and_unload"):
                model.save_pretrained(tmp / "adapter", safe_serialization=True)
                model = model.merge_and_unload()  # replaces the LoRA layers in place: the run is over
                self.model = model
            if full is None:
                model.save_pretrained(tmp, safe_serialization=True)
            else:
                model.save_pretrained(tmp, state_dict=full, safe_serialization=True)
                _fix_architecture(tmp / "config.json", type(model).__name__, self.architecture)
            if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(tmp)
        self._barrier()
        return final

    def _log(self, record: dict) -> None:
        if self.rank != 0 or self.output is None:
            return
        with open(self.output / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if getattr(self, "_tb", None) is None and "loss" in record:
            self._tb = _tensorboard(self.output)
        if getattr(self, "_tb", None) and "loss" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])

    def _bar(self):
        if not self.progress or self.rank != 0:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        what = "finetune" if self.config.task == "finetune" else f"unlearn {self.config.unlearn.method}"
        return tqdm(total=self.config.max_steps, initial=self.step, desc=what, unit="step")


def _fix_architecture(config_json: Path, written: str, original: str) -> None:
    """FSDP renames the model's class (FSDPLlamaForCausalLM); config.json must name the original."""
    if written == original or not config_json.exists():
        return
    data = json.loads(config_json.read_text())
    data["architectures"] = [original if a == written else a for a in data.get("architectures") or []]
    config_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _tensorboard(output: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return False
    return SummaryWriter(str(output / "tensorboard"))
