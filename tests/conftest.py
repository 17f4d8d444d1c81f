import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py and tests/models.py

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
