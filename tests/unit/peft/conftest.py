"""Shared settings for the PEFT tests; the tiny models live in peft_tiny_models.py."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _few_threads():
    # The test machine is shared; tiny tensors gain nothing from more threads.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
