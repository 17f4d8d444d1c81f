import pytest
import torch
from analyze_testlib import FixtureRuns


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # Small models on a shared 2-core machine: one intra-op thread is several times faster.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def fixture_runs(tmp_path_factory):
    return FixtureRuns(tmp_path_factory.mktemp("fixture-runs"))
