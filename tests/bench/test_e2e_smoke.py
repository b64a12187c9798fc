"""Smoke run of bench/e2e.py: a tiny Llama, two steps, ours vs reference NPO, into a temporary JSON file."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _e2e():
    sys.path.insert(0, str(BENCH))
    import e2e

    return e2e


def test_e2e_smoke_schema_and_ratios(tmp_path):
    e2e = _e2e()
    out = tmp_path / "e2e.json"
    e2e.main(["--model-size", "tiny", "--variants", "ours_npo,ref_npo", "--steps", "2", "--warmup", "0",
              "--device", "cpu", "--json", str(out)])
    run = json.loads(out.read_text())
    assert run["benchmark"] == "e2e"
    env = run["environment"]
    assert env["device"].startswith("cpu") and env["versions"]["torch"] and env["date"]
    assert run["shape_name"] == "tiny" and run["shapes"]["steps"] == 2
    for variant in ("ours_npo", "ref_npo"):
        fig = run["variants"][variant]
        assert "error" not in fig, fig
        assert fig["fits"] is True
        for key in ("median_step_s", "median_cpu_s", "tokens_per_s", "peak_extra_mb", "peak_total_mb",
                    "peak_method_mb", "training_state_mb", "model_mb", "first_loss"):
            assert isinstance(fig[key], (int, float)) and math.isfinite(fig[key]), (variant, key, fig[key])
        assert fig["median_step_s"] > 0 and fig["tokens_per_s"] > 0 and fig["peak_total_mb"] > fig["model_mb"]
        # gradients + AdamW's two moments of every (trainable) weight
        assert fig["training_state_mb"] == pytest.approx(3 * fig["model_mb"], rel=1e-3)  # + AdamW step counters
        assert fig["peak_method_mb"] == pytest.approx(fig["peak_extra_mb"] - fig["training_state_mb"])
        # CPU: step times from a process with glibc's default allocator, memory from the mmap-policy one
        assert fig["timing_allocator"].startswith("glibc default") and fig["median_step_s_mmap_policy"] > 0
    ratios = run["ratios"]
    # only the ratios whose two variants ran
    assert set(ratios) == {"ref_over_ours_time", "ref_over_ours_memory", "ref_over_ours_method_memory",
                           "ref_over_ours_total_memory", "ref_over_ours_time_cpu"}
    for key, value in ratios.items():
        assert math.isfinite(value) and value > 0, (key, value)
    # same init and batches: both implementations compute the same objective
    assert run["first_loss_rel_diff"]["npo"] < 1e-4
    assert (tmp_path / run["plot"]).exists()
    # a results file outside bench/results leaves bench/RESULTS.md alone: the summary is recomputed from the file
    assert e2e.summarise(run["variants"])[0] == ratios


def test_e2e_summarise_targets():
    e2e = _e2e()
    fig = lambda t, m: {"median_step_s": t, "peak_extra_mb": m, "peak_method_mb": m - 90.0}  # noqa: E731
    results = {"ours_npo": fig(1.0, 100.0), "ref_npo": fig(2.0, 250.0), "ours_npo_ilu": fig(1.6, 100.0),
               "ours_npo_sam": fig(2.0, 120.0), "ours_npo_sam_ilu": fig(2.5, 120.0), "ref_npo_sam_ilu": fig(9.0, 400.0)}
    ratios, targets = e2e.summarise(results)
    assert ratios["ilu_over_npo"] == 1.6 and ratios["sam_over_npo"] == 2.0 and ratios["sam_ilu_over_npo"] == 2.5
    assert ratios["ref_over_ours_time"] == 2.0 and ratios["ref_over_ours_memory"] == 2.5
    assert ratios["ref_over_ours_method_memory"] == 16.0
    assert ratios["ref_over_ours_time_sam_ilu"] == 3.6
    assert targets == {"ilu_over_npo <= 1.4": False, "sam_over_npo <= 1.5": False,
                       "ref_over_ours_time >= 2": True, "ref_over_ours_method_memory >= 2.5": True}


def test_e2e_summarise_adv():
    e2e = _e2e()
    results = {"ours_npo": {"median_step_s": 1.0, "median_cpu_s": 0.5, "peak_extra_mb": 100.0},
               "ours_npo_adv": {"median_step_s": 4.0, "median_cpu_s": 2.5, "peak_extra_mb": 110.0, "model_mb": 40.0,
                                "attack_step_over_fwd_bwd": 0.8, "attack_step_over_fwd_bwd_cpu": 0.7}}
    ratios, targets = e2e.summarise(results)
    assert ratios["adv_over_npo"] == 4.0 and ratios["adv_over_npo_cpu"] == 5.0
    assert ratios["attack_step_over_fwd_bwd"] == 0.8 and ratios["attack_step_over_fwd_bwd_cpu"] == 0.7
    assert ratios["adv_extra_peak_over_params"] == 0.25  # (110 - 100) / 40
    assert targets == {"attack_step_over_fwd_bwd <= 0.75": False, "adv_extra_peak_over_params < 1": True,
                       "attack_step_over_fwd_bwd <= 0.75 (cpu time)": True}


def test_e2e_rejects_unknown_variant():
    import pytest

    e2e = _e2e()
    with pytest.raises(ValueError, match="unknown variant"):
        e2e.parse_variant("ours_dpo")


def _grads_after(model, fn):
    model.zero_grad(set_to_none=True)
    fn()
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


def _moved_model_and_batches():
    """A tiny Llama moved away from its start weights (so that NPO's Δ is not zero) and forget (with the
    start model's reference NLL), retain and environment batches."""
    import torch

    import unlearn_fast as uf
    from unlearn_fast.testing.tiny import make_batch, tiny_llama

    model = tiny_llama(layers=3)
    forget, retain, env = make_batch(1), make_batch(2), make_batch(3)
    forget["ref_nll"] = uf.reference_nll(
        model, [{"input_ids": i[m.bool()], "labels": y[m.bool()]}
                for i, y, m in zip(forget["input_ids"], forget["labels"], forget["attention_mask"])])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, forget, retain, env


def test_reference_gradients_match_ours():
    """The benchmark's reference re-implementation computes the same step gradient as uf (fair comparison)."""
    import torch

    import unlearn_fast as uf
    from unlearn_fast.testing.tiny import tiny_llama

    sys.path.insert(0, str(BENCH))
    from reference_unlearn import ReferenceUnlearner

    model, forget, retain, env = _moved_model_and_batches()
    for sam, irm in ((0.05, 2.0),):  # NPO + retain + SAM + ILU: every term of the benchmark's NPO variants
        config = uf.UnlearnConfig(method="npo", beta=0.5, retain_weight=1.5, sam_rho=sam,
                                  irm="logit" if irm else None, irm_weight=irm)
        ours = _grads_after(model, lambda: uf.unlearning_gradients(model, forget, retain, [env], config))
        ref_model = tiny_llama(layers=3)  # the reference model holds the start weights
        ref = ReferenceUnlearner(ref_model, "npo", beta=0.5, retain_weight=1.5, sam_rho=sam, irm_weight=irm)
        ref_model.load_state_dict(model.state_dict())
        theirs = _grads_after(ref_model, lambda: ref.gradients(forget, retain, [env]))
        for a, b in zip(ours, theirs):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), (sam, irm, (a - b).abs().max())

    rmu_model = tiny_llama(layers=3)
    names = uf.rmu_trainable(rmu_model, 1, span=2)
    assert names
    twin = tiny_llama(layers=3)
    uf.rmu_trainable(twin, 1, span=2)
    config = uf.UnlearnConfig(method="rmu", rmu_layer=1, rmu_steering=3.0, rmu_alpha=10.0, compat="reference")
    u = uf.objectives.rmu.steering_vector(32, 0, "cpu", torch.float32)
    ref = ReferenceUnlearner(twin, "rmu", rmu_layer=1, rmu_steering=3.0, rmu_alpha=10.0, steering=u)
    ours = _grads_after(rmu_model, lambda: uf.unlearning_gradients(rmu_model, forget, retain, config=config))
    theirs = _grads_after(twin, lambda: ref.gradients(forget, retain))
    compared = 0
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()
            compared += 1
    assert compared == 2


def test_plain_loop_gradients_match_ours():
    """The well-written plain baseline computes the same step gradient as uf (fair comparison)."""
    import torch

    import unlearn_fast as uf

    sys.path.insert(0, str(BENCH))
    from plain_unlearn import PlainUnlearner

    model, forget, retain, env = _moved_model_and_batches()
    before = [p.detach().clone() for p in model.parameters()]
    for sam, irm in ((0.0, 0.0), (0.05, 2.0)):
        config = uf.UnlearnConfig(method="npo", beta=0.5, retain_weight=1.5, sam_rho=sam,
                                  irm="logit" if irm else None, irm_weight=irm)
        ours = _grads_after(model, lambda: uf.unlearning_gradients(model, forget, retain, [env] if irm else [],
                                                                   config))
        plain = PlainUnlearner(model, beta=0.5, retain_weight=1.5, sam_rho=sam, irm_weight=irm)
        theirs = _grads_after(model, lambda: plain.gradients(forget, retain, [env] if irm else []))
        for a, b in zip(ours, theirs):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), (sam, irm, (a - b).abs().max())
        assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before)), "θ restored exactly"


def test_e2e_merge_timing_takes_times_from_the_timing_process():
    e2e = _e2e()
    memory = {"impl": "ours", "method": "npo", "median_step_s": 2.0, "tokens_per_s": 50.0, "median_cpu_s": 2.0,
              "peak_extra_mb": 300.0, "first_loss": 1.5, "fits": True, "rounds": 2}
    timing = {"impl": "ours", "method": "npo", "median_step_s": 1.0, "tokens_per_s": 100.0, "median_cpu_s": 0.9,
              "fits": True, "rounds": 2}
    merged = e2e.merge_timing(memory, timing)
    assert merged["median_step_s"] == 1.0 and merged["tokens_per_s"] == 100.0 and merged["median_cpu_s"] == 0.9
    assert merged["median_step_s_mmap_policy"] == 2.0 and merged["peak_extra_mb"] == 300.0
    assert merged["first_loss"] == 1.5 and merged["rounds"] == 2
    failed = {"error": "boom"}
    assert e2e.merge_timing(failed, timing) == failed and e2e.merge_timing(memory, failed) == failed


def test_e2e_terms_smoke_floors_follow_from_the_terms(tmp_path):
    """bench/e2e_terms.py on the tiny shape: every term and whole step timed, and the step-ratio floors it
    reports are the sums of its terms that its docstring states (NPO = F + R + O, ILU adds E, SAM replaces F
    by F_dir + S + F')."""
    _e2e()  # puts bench/ on the path
    import e2e_terms

    out, threads = tmp_path / "terms.json", torch.get_num_threads()
    try:
        e2e_terms.main(["--model-size", "tiny", "--rounds", "1", "--device", "cpu", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    run = json.loads(out.read_text())
    assert run["environment"]["cpu_model"] and run["shape_name"] == "tiny"
    med = {k: fig["median_s"] for k, fig in run["variants"].items()}
    assert set(med) == {f"term_{t}" for t in e2e_terms.TERMS} | {f"step_{m}" for m in e2e_terms.METHODS}
    assert all(math.isfinite(v) and v > 0 for v in med.values()), med
    t = {k.removeprefix("term_"): v for k, v in med.items() if k.startswith("term_")}
    npo = t["forget"] + t["retain"] + t["optimizer"]
    s = run["ratios"]
    assert s["ilu_over_npo_from_terms"] == pytest.approx((npo + t["environment"]) / npo)
    assert s["sam_over_npo_from_terms"] == pytest.approx(
        (t["forget_direction"] + t["sam_move"] + t["sam_restore"] + t["forget_perturbed"] + t["retain"] + t["optimizer"]) / npo)
    assert s["environment_over_retain"] == pytest.approx(t["environment"] / t["retain"])
    assert s["ilu_over_npo_steps"] == pytest.approx(med["step_npo_ilu"] / med["step_npo"])
