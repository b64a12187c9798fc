"""A model path that does not exist is reported as a missing directory, not as a malformed hub id."""
import dataclasses

import pytest

from unlearn_fast.train import ConfigError
from unlearn_fast.train.config import TrainConfig
from unlearn_fast.train.setup import load_model


@pytest.mark.parametrize("path", ["/no/such/model", "./no-such-model"])
def test_missing_model_directory_is_named(path):
    with pytest.raises(ConfigError, match="does not exist") as err:
        load_model(dataclasses.replace(TrainConfig(), model=path))
    assert "repo" not in str(err.value).lower()
