"""Test configuration: nothing may reach the network or a model hub; shared fixtures."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["DIFFALIGN_NETGUARD"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from diffalign.testing import netguard  # noqa: E402

netguard.install()


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """One torch thread for the test (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``):
    small models run no slower, and concurrent test processes do not oversubscribe the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
