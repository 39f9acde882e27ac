"""The library's thread policy: one torch thread unless the user chose a count."""

from __future__ import annotations

import pytest
import torch

from fedcore.rounds import _threads

from .test_federation import _federation


@pytest.fixture
def fresh_policy(monkeypatch):
    """A process where the policy has not run and torch is at a default of 3 threads."""
    before = torch.get_num_threads()
    for name in _threads.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_threads, "_applied", False)
    monkeypatch.setattr(_threads, "_AT_IMPORT", 3)
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def test_building_a_federation_sets_one_thread_once(fresh_policy):
    _federation()
    assert torch.get_num_threads() == 1
    torch.set_num_threads(3)  # the user's count after the first federation stands
    _federation()
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize("name", _threads.THREAD_VARIABLES)
def test_a_thread_variable_in_the_environment_is_respected(fresh_policy, monkeypatch, name):
    monkeypatch.setenv(name, "3")
    assert _threads.use_library_threads() is False
    assert torch.get_num_threads() == 3


def test_a_count_set_after_importing_fedcore_is_respected(fresh_policy):
    torch.set_num_threads(2)
    assert _threads.use_library_threads() is False
    assert torch.get_num_threads() == 2
