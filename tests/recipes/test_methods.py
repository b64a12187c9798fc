"""The one method-string parser (recipes and bench/e2e.py both use it)."""
import pytest

from unlearn_fast.recipes.methods import Method, objective_settings, parse_method


@pytest.mark.parametrize("text, expected", [
    ("npo", Method("npo", False, False)), ("npo+sam", Method("npo", True, False)),
    ("npo+sam+ilu", Method("npo", True, True)), ("npo_ilu", Method("npo", False, True)),
    ("ga+ilu", Method("ga", False, True)), ("rmu", Method("rmu", False, False)), ("rmu+ilu", Method("rmu", False, True)), ("simnpo+sam", Method("simnpo", True, False)),
])
def test_parse(text, expected):
    assert parse_method(text) == expected
    assert parse_method(expected.name) == expected


@pytest.mark.parametrize("text", ["sgd", "npo+adam", "npo+sam+sam", "rmu+sam", ""])
def test_unknown_methods_name_what_is_allowed(text):
    with pytest.raises(ValueError, match="BASE\\[\\+sam\\]\\[\\+ilu\\]"):
        parse_method(text)


def test_objective_settings_switch_on_only_the_named_parts():
    assert objective_settings(parse_method("npo"), sam_rho=0.1, irm_weight=0.3) == {"method": "npo"}
    assert objective_settings(parse_method("npo+sam+ilu"), sam_rho=0.1, irm_weight=0.3) == {
        "method": "npo", "sam_rho": 0.1, "irm": "logit", "irm_weight": 0.3}


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
