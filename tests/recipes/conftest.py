from tests.eval.conftest import one_thread  # noqa: F401  (the same one-thread fixture for the recipe runs)
