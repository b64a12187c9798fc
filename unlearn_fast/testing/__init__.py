"""Naive, obviously-correct reference implementations and tiny models that the tests and the benches
both import (bench/ never imports tests/). Not used by the library itself."""
