"""FSDP2 on gloo (``parallel: fsdp``): two processes, each holding half of every weight and half of the global
batch, end with the weights of one process trained on the whole batch (NPO, and NPO + SAM whose perturbation
needs the global gradient). NPO runs layer by layer (layer 0 is freed again while layer 1 runs; FSDP reduces
the gradients, the LM head's included), NPO + SAM with the step gathered (the trainer's hooks average). The
final model is written whole by process 0, and a run resumed from its
checkpoint (sharded FusedAdamW state gathered into the file, cut back into shards on load) ends where the
uninterrupted run ended.

SGD for the comparison with one process, as in test_distributed.py (why: see there). Clipping is on
(clip=1.0, gradient norms are larger), so the clip norm has to be the norm over both shards.
"""
import shutil

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.train.helpers import equal_length_examples
from tests.train.test_distributed import CONFIG, free_port
from unlearn_fast.testing.tiny import tiny_llama

RUNS = {"npo": dict(sam_rho=0.0), "npo_sam": dict(sam_rho=0.05)}
BF16 = dict(dtype="bfloat16", master_weights=True, grad_accum=2, clip=0.0, max_steps=2, sam_rho=0.0)


def train(output, batch_size, *, sgd=True, resume=False, seen=None, **overrides):
    from unlearn_fast.train import Trainer, build_config

    config = build_config(dict(CONFIG, batch_size=batch_size, **overrides))
    model = tiny_llama(layers=2, seed=0, dtype=torch.bfloat16 if config.dtype == "bfloat16" else torch.float32)
    if seen is not None:  # what layer 1's forward sees: layer 0's weight (freed again?) and the LM head
        def look(module, args):
            seen.add((type(model.model.layers[0].mlp.up_proj.weight).__name__, type(model.lm_head.weight).__name__))
        model.model.layers[1].register_forward_pre_hook(look)
    sgd_fn = (lambda params, cfg: torch.optim.SGD(params, lr=cfg.lr)) if sgd else None  # noqa: E731
    trainer = Trainer(model, None, config, forget=equal_length_examples(0, 8), retain=equal_length_examples(1, 8),
                      output_dir=output, progress=False, optimizer=sgd_fn)
    trainer.train(resume=resume)
    return trainer


def worker(rank, world, port, output):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different RNG per process: rank 0's weights must win the broadcast
        for name, overrides in RUNS.items():
            seen = set()
            trainer = train(f"{output}/{name}", 4 // world, parallel="fsdp", seen=seen, **overrides)
            # NPO only calls backward: FSDP gathers, frees and reduce-scatters layer by layer; SAM needs the step gathered
            assert trainer.sharding.layerwise == (name == "npo")
            assert seen == ({("DTensor", "Parameter")} if name == "npo" else {("Parameter", "Parameter")}), seen
            shards = {n: p.detach().clone() for n, p in zip(trainer.sharding.names, trainer.params)}
            torch.save(shards, f"{output}/{name}-shards{rank}.pt")
        # bf16 weights with fp32 masters (per shard), two micro-batches: the same ops as data parallelism
        for parallel in ("ddp", "fsdp"):
            train(f"{output}/bf16-{parallel}", 4 // world, parallel=parallel, **BF16)
        # resume: FusedAdamW's sharded state goes through the checkpoint file and back
        train(f"{output}/adamw", 4 // world, sgd=False, parallel="fsdp", lr=1e-3)
        if rank == 0:
            shutil.copy(f"{output}/adamw/final/model.safetensors", f"{output}/adamw-uninterrupted.safetensors")
        torch.distributed.barrier()
        train(f"{output}/adamw", 4 // world, sgd=False, parallel="fsdp", lr=1e-3, resume=True)  # from checkpoint-2
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    # fork: the children inherit the imported modules (spawn would re-import torch and transformers in each)
    mp.start_processes(worker, args=(2, free_port(), str(out)), nprocs=2, join=True, start_method="fork")
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_fsdp_two_processes_match_one_process_with_the_global_batch(fsdp_runs, tmp_path, name):
    final = load_file(str(fsdp_runs / name / "final" / "model.safetensors"))
    single = train(tmp_path / "single", 4, **RUNS[name]).model.state_dict()
    start = tiny_llama(layers=2, seed=0).state_dict()
    moved = 0.0
    for key, value in single.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=1e-6, msg=key)
        moved = max(moved, float((value - start[key]).abs().max()))
    assert moved > 1e-3  # the runs trained: the comparison is not between two untouched models
    # each process held half of every weight: its shard is its half of the final weights
    shards = [torch.load(fsdp_runs / f"{name}-shards{r}.pt") for r in (0, 1)]
    for key, half in shards[0].items():
        assert half.shape[0] == (final[key].shape[0] + 1) // 2
        torch.testing.assert_close(torch.cat([half, shards[1][key]]), final[key], rtol=0, atol=0, msg=key)
    metrics = (fsdp_runs / name / "metrics.jsonl").read_text()
    assert (fsdp_runs / name / "checkpoint-2").is_dir() and (name != "npo_sam" or "sam_norm" in metrics)


def test_fsdp_bf16_master_weights_and_accumulation_equal_data_parallel(fsdp_runs):
    # clip=0: no global norm, so both modes run the same operations and must agree bit for bit
    ddp, fsdp = (load_file(str(fsdp_runs / f"bf16-{p}" / "final" / "model.safetensors")) for p in ("ddp", "fsdp"))
    start = tiny_llama(layers=2, seed=0, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(ddp[k], fsdp[k]) for k in ddp)
    assert any(not torch.equal(ddp[k], start[k]) for k in ddp)


def test_fsdp_checkpoint_holds_full_tensors_and_resume_ends_where_the_uninterrupted_run_ended(fsdp_runs):
    run = fsdp_runs / "adamw"
    ckpt = run / "checkpoint-2"
    start = tiny_llama(layers=2, seed=0)
    model = load_file(str(ckpt / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in model.items()} == {k: tuple(v.shape) for k, v in start.state_dict().items()}
    optim = load_file(str(ckpt / "optimizer.safetensors"))
    for i, p in enumerate(start.parameters()):  # gathered state, not one process's shard
        assert optim[f"{i}.exp_avg"].shape == p.shape and optim[f"{i}.exp_avg"].abs().sum() > 0
    assert "resumed" in (run / "metrics.jsonl").read_text()
    uninterrupted = load_file(str(fsdp_runs / "adamw-uninterrupted.safetensors"))
    resumed = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    assert any(not torch.equal(uninterrupted[k], model[k]) for k in uninterrupted)  # step 3 moved the weights
