"""The one method-string parser (recipes and bench/e2e.py both use it)."""
import pytest

from unlearn_fast.recipes.methods import Method, objective_settings, parse_method


@pytest.mark.parametrize("text, expected", [
    ("npo", Method("npo", False, False)), ("npo+sam", Method("npo", True, False)),
    ("npo+sam+ilu", Method("npo", True, True)), ("npo_ilu", Method("npo", False, True)),
    ("ga+ilu", Method("ga", False, True)), ("rmu", Method("rmu", False, False)), ("rmu+ilu", Method("rmu", False, True)), ("simnpo+sam", Method("simnpo", True, False)),
    ("npo+adv", Method("npo", False, False, True)), ("ga+adv", Method("ga", False, False, True)),
    ("npo+sam+adv", Method("npo", True, False, True)), ("npo_adv_sam", Method("npo", True, False, True)),
    ("npo+sam+ilu+adv", Method("npo", True, True, True)),
])
def test_parse(text, expected):
    assert parse_method(text) == expected
    assert parse_method(expected.name) == expected


@pytest.mark.parametrize("text", ["sgd", "npo+adam", "npo+sam+sam", "rmu+sam", "", "rmu+adv", "npo+adv+adv",
                                  "adv", "npo+advx"])
def test_unknown_methods_name_what_is_allowed(text):
    with pytest.raises(ValueError, match="BASE\\[\\+sam\\]\\[\\+ilu\\]"):
        parse_method(text)


def test_objective_settings_switch_on_only_the_named_parts():
    assert objective_settings(parse_method("npo"), sam_rho=0.1, irm_weight=0.3) == {"method": "npo"}
    assert objective_settings(parse_method("npo+sam+ilu"), sam_rho=0.1, irm_weight=0.3) == {
        "method": "npo", "sam_rho": 0.1, "irm": "logit", "irm_weight": 0.3}


def test_adv_switches_on_the_attack_with_the_given_settings():
    import unlearn_fast as uf

    adv = dict(adv_eps=0.1, adv_steps=3, adv_step_size=2e-3)
    assert objective_settings(parse_method("npo+adv"), sam_rho=0.1, irm_weight=0.3, **adv) == {"method": "npo", **adv}
    settings = objective_settings(parse_method("npo+sam+adv"), sam_rho=0.1, irm_weight=0.3, **adv)
    assert settings == {"method": "npo", "sam_rho": 0.1, **adv}
    config = uf.UnlearnConfig(**settings)  # a valid objective: C-AdvUL under SAM
    assert (config.adv_eps, config.adv_steps, config.adv_step_size, config.sam_rho) == (0.1, 3, 2e-3, 0.1)
    # without +adv the attack stays off whatever adv settings the caller passes
    assert "adv_eps" not in objective_settings(parse_method("npo+sam"), sam_rho=0.1, irm_weight=0.3, **adv)
    # the defaults are the public C-AdvUL code's
    assert objective_settings(parse_method("ga+adv"), sam_rho=0.1, irm_weight=0.3) == {
        "method": "ga", "adv_eps": 0.05, "adv_steps": 10, "adv_step_size": 1e-4}


def test_the_main_job_runs_npo_adv_by_default():
    from unlearn_fast.recipes.run import ALL_METHODS, UnlearnSpec, default_methods, method_config

    assert "npo+adv" in ALL_METHODS
    spec = UnlearnSpec()
    config, lr = method_config("npo+sam+adv", spec, 4, seed=0)
    assert (config.method, config.sam_rho, config.beta) == ("npo", spec.sam_rho, spec.npo_beta)
    assert (config.adv_eps, config.adv_steps, config.adv_step_size) == (spec.adv_eps, spec.adv_steps,
                                                                       spec.adv_step_size)
    assert method_config("npo", spec, 4, seed=0)[0].adv_eps == 0
    assert method_config("ga+adv", spec, 4, seed=0)[1] == spec.ga_lr * spec.adv_lr_scale
    assert "npo+adv" in default_methods()


def test_bench_and_run_read_the_same_names():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    try:
        import e2e
    finally:
        sys.path.pop(0)
    for variant in e2e.METHODS:
        parse_method(variant)  # every bench method is a method string the recipes accept
    assert "ours_npo_adv" in e2e.ALL_VARIANTS and "ref_npo_adv" not in e2e.ALL_VARIANTS  # ours only
    with pytest.raises(ValueError, match="unknown variant"):
        e2e.parse_variant("plain_npo_adv")
