"""Data parallel on gloo: two processes, each with half of the global batch, end with identical weights that
equal a one-process run on the whole batch (NPO + SAM, whose perturbation needs the global gradient).

SGD through the Trainer's ``optimizer`` hook: weight differences are then lr × gradient differences (fp32
reduction order). Adam would divide near-zero gradients by their own tiny second moments and blow the
rounding differences of rarely-used lm_head rows up to ~3% of a step.
"""
import socket

import torch
import torch.multiprocessing as mp

from tests.train.helpers import equal_length_examples
from unlearn_fast.testing.tiny import tiny_llama

STEPS = 3
CONFIG = {"method": "npo", "sam_rho": 0.05, "retain_weight": 0.5, "lr": 0.05, "max_steps": STEPS,
          "save_every": 2, "max_length": 16, "warmup_ratio": 0.0, "seed": 3}


def train(output, batch_size):
    from unlearn_fast.train import Trainer, build_config

    config = build_config(dict(CONFIG, batch_size=batch_size))
    model = tiny_llama(layers=2, seed=0)
    sgd = lambda params, cfg: torch.optim.SGD(params, lr=cfg.lr)  # noqa: E731
    trainer = Trainer(model, None, config, forget=equal_length_examples(0, 8), retain=equal_length_examples(1, 8),
                      output_dir=output, progress=False, optimizer=sgd)
    trainer.train()
    return trainer


def worker(rank, world, port, output):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different RNG per process: rank 0's weights must win the broadcast
        trainer = train(output + "/run", batch_size=4 // world)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, f"{output}/rank{rank}.safetensors")
    finally:
        torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process_with_the_global_batch(tmp_path):
    # fork: the children inherit the imported modules (spawn would re-import torch and transformers in each)
    mp.start_processes(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    from safetensors.torch import load_file

    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "processes ended with different weights"
    single = train(tmp_path / "single", batch_size=4)
    start = tiny_llama(layers=2, seed=0).state_dict()
    moved = 0.0
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(rank0[name], value, rtol=0, atol=1e-6, msg=name)
        moved = max(moved, float((value - start[name]).abs().max()))
    assert moved > 1e-3  # the runs trained: the comparison is not between two untouched models
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "sam_norm" in metrics and (tmp_path / "run" / "checkpoint-2").is_dir()
