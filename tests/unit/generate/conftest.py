"""Fixtures of the generation tests: a tiny imported model of each family (see tests/helpers/generation.py)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.generation import FAMILIES, TinyModel, write_model


@pytest.fixture(autouse=True)
def _few_threads():
    # The test machine is shared; tiny tensors gain nothing from more threads.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model(request, tmp_path_factory) -> TinyModel:
    return write_model(tmp_path_factory.mktemp(f"gen-{request.param}"), request.param)


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> TinyModel:
    return write_model(tmp_path_factory.mktemp("gen-llama"), "llama")
