"""Test configuration: nothing may reach the network or a model hub."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["DIFFALIGN_NETGUARD"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from diffalign.testing import netguard  # noqa: E402

netguard.install()
