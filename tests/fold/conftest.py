"""BN-folding tests: see fold_testlib (imported first: it makes ``normscope.fold`` importable
even while the rest of the package is still being built)."""

import fold_testlib  # noqa: F401
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
