"""Shared helpers of the generator-adapter tests: tiny pipeline builders and a network guard."""

from __future__ import annotations

import socket

import pytest
import torch

from diffalign.testing import netguard
from diffalign.testing.tiny import (
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
)

# Short T5 sequences keep the tiny transformers fast; pipeline calls compared against get the same value.
SEQ_LEN = 16

BUILDERS = {
    "sd3": lambda: tiny_sd3_pipeline(),
    "sd3_t5": lambda: tiny_sd3_pipeline(with_t5=True),
    "sd35m": lambda: tiny_sd3_pipeline(sd35_medium=True),
    "flux": lambda: tiny_flux_pipeline(),
    "flux_schnell": lambda: tiny_flux_pipeline(guidance_embeds=False),
    "sd15": lambda: tiny_sd15_pipeline(),
    "sd15_v": lambda: tiny_sd15_pipeline(prediction_type="v_prediction"),
    "sdxl": lambda: tiny_sdxl_pipeline(),
}

PROMPTS = ["a red circle left of a blue square", "two green triangles"]


def text_kwargs(name: str) -> dict:
    """Keyword arguments shared by ``encode_prompts`` and the pipeline call for this model."""
    return {"max_sequence_length": SEQ_LEN} if name.startswith(("sd3", "flux")) else {}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run the tiny models on one thread: on a shared 2-core machine, intra-op threads of 100k-parameter
    models spin against other processes (measured 8x slower); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_network():
    """Acceptance "nothing reaches the network": conftest installs ``diffalign.testing.netguard``, which makes
    connections fail; this also catches attempts a library swallowed (e.g. a hub client falling back to
    its cache) by checking that the guard recorded none."""
    assert socket.socket.connect is netguard._connect, (
        "the network guard is not installed (tests/conftest.py)"
    )
    before = len(netguard.attempts)
    yield
    assert netguard.attempts[before:] == [], f"network access attempted: {netguard.attempts[before:]}"
