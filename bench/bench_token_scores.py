"""Per-token log p(y), E_p[log p] and Var_p[log p] (min-k%++'s inputs): logits-free vs materialised logits.

Variants, each in a fresh process (its peak resident memory is its own):
- ``materialised``: what an evaluation script writes (open-unlearning's ``tokenwise_vocab_logprobs``):
  logits = h @ Wᵀ [N, V] fp32, log_softmax, gather, then μ, σ² from the [N, V] log-probabilities;
- ``unlearn_fast``: ``unlearn_fast.eval.token_scores._moments`` (token chunks of a [C, V] block):
  log p(y), μ and σ² in one pass, as ``token_scores(moments=True)`` computes them.

    python bench/bench_token_scores.py [--tokens 4096 --hidden 512 --vocab 32768 --repeats 3]

Writes bench/results/token_scores-cpu<N>-<date>.json (does not touch RESULTS.md).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent


def inputs(n, h, v):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / h ** 0.5,
            torch.randint(0, v, (n,), generator=g))


def materialised(hidden, weight, target):
    logp = torch.log_softmax(hidden @ weight.T, dim=-1)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * logp.square()).sum(-1) - mu.square()
    return logp.gather(1, target[:, None]).squeeze(1), mu, var


def fused(hidden, weight, target):
    import unlearn_fast as uf
    from unlearn_fast.eval.token_scores import _moments

    if os.environ.get("BENCH_TWO_PASSES"):  # log p(y) from the fused op, moments from a second pass
        logp = -uf.ops.linear_cross_entropy(hidden, weight, target, reduction="none")
        return (logp, *_moments(hidden, weight, None))
    return _moments(hidden, weight, None, target)  # what token_scores(moments=True) runs: one pass


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS(threading.Thread):
    """Samples the resident set size every millisecond (ru_maxrss would include the set-up's peak)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = rss_bytes(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)


def child(variant, n, h, v, repeats):
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    hidden, weight, target = inputs(n, h, v)
    fn = materialised if variant == "materialised" else fused
    fn(hidden[:8], weight, target[:8])  # warm-up (imports, first allocations)
    base = rss_bytes()
    sampler = PeakRSS()
    sampler.start()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(hidden, weight, target)
        times.append(time.perf_counter() - t)
    sampler.running = False
    sampler.join()
    peak = max(sampler.peak, rss_bytes())
    ref = materialised(hidden[:256].double(), weight.double(), target[:256])
    err = max(float((a[:256].double() - b).abs().max()) for a, b in zip(out, ref))
    print(json.dumps({"median_s": statistics.median(times), "times_s": times,
                      "peak_extra_rss_mib": (peak - base) / 2 ** 20, "max_abs_err_vs_fp64_first_256": err}))


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.tokens, args.hidden, args.vocab, args.repeats)
    results = {}
    for variant in ("materialised", "unlearn_fast"):
        cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens), "--hidden",
               str(args.hidden), "--vocab", str(args.vocab), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[variant] = json.loads(out)
        print(variant, results[variant], flush=True)
    m, f = results["materialised"], results["unlearn_fast"]
    record = {"benchmark": "token_scores", "shapes": {"tokens": args.tokens, "hidden": args.hidden,
                                                      "vocab": args.vocab},
              "device": "cpu", "cpu": cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": platform.python_version(), "variants": results,
              "ratios": {"time_materialised_over_fused": m["median_s"] / f["median_s"],
                         "peak_rss_materialised_over_fused": m["peak_extra_rss_mib"] / max(f["peak_extra_rss_mib"],
                                                                                           1e-9)}}
    print(json.dumps(record["ratios"]))
    path = BENCH / "results" / f"token_scores-cpu{os.cpu_count()}-{datetime.date.today()}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(path)


if __name__ == "__main__":
    main()
