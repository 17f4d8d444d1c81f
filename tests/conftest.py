import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py and tests/models.py

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _fused_kernel():
    """Load the fused CPU kernel for the whole session, building it first if this machine has
    no build (scripts/setup.sh builds it). NORMSCOPE_REQUIRE_KERNEL=1 (scripts/test.sh) makes a
    failed build fail the run instead of testing the torch path only."""
    from normscope.collect import native

    if native.mode() != "off":
        try:
            native.build()
        except Exception as e:
            if os.environ.get("NORMSCOPE_REQUIRE_KERNEL") == "1":
                pytest.exit(f"the fused CPU kernel did not build: {e}", returncode=1)
        native.load(background_build=False)
    yield
