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

# diffusers and transformers give their loggers a handler bound to the sys.stderr of the moment they are first
# configured. Configured inside a test that uses capsys, it writes to that test's capture stream, closed after it,
# and every later library warning prints a "--- Logging error ---" traceback into another test's stderr (which
# broke a test that checks stderr has no traceback, depending on the order the tests ran in). Configure them now,
# on the session's stream.
from diffusers.utils import logging as _diffusers_logging  # noqa: E402
from transformers.utils import logging as _transformers_logging  # noqa: E402

_diffusers_logging.get_logger("diffusers")
_transformers_logging.get_logger("transformers")


@pytest.fixture
def one_thread():
    """One torch thread for the test (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``):
    small models run no slower, and concurrent test processes do not oversubscribe the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
