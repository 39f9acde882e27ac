import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedcore import ParameterLayout

from .toy import ToyModel


def test_round_trip_is_exact_and_excludes_local_and_frozen():
    torch.manual_seed(0)
    model = ToyModel(5)
    layout = ParameterLayout(model, local_only=("private_*",))
    assert layout.names == ("linear.weight", "linear.bias")
    assert layout.size == 6
    vec = layout.flatten(model)
    assert vec.dtype == torch.float32 and vec.shape == (6,)
    other = ToyModel(5)
    layout.load_into(other, vec)
    assert torch.equal(layout.flatten(other), vec)
    assert torch.equal(other.private_offset, torch.zeros(1))  # local-only never written
    sd = layout.to_state_dict(vec)
    assert set(sd) == {"linear.weight", "linear.bias"}
    assert torch.equal(layout.from_state_dict(model.state_dict()), vec)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=6, max_size=6))
def test_any_float32_vector_round_trips_bit_for_bit(values):
    model = ToyModel(5)
    layout = ParameterLayout(model, local_only=lambda name: name.startswith("private"))
    vec = torch.tensor(values, dtype=torch.float32)
    layout.load_into(model, vec)
    assert torch.equal(layout.flatten(model).view(torch.int32), vec.view(torch.int32))


def test_local_state_holds_only_local_parameters():
    model = ToyModel(3)
    layout = ParameterLayout(model, local_only=("private_*",))
    assert set(layout.local_state(model)) == {"private_offset"}
    assert layout.is_local("private_offset") and not layout.is_local("linear.bias")


def test_refuses_non_float32_shared_parameter():
    model = nn.Linear(2, 2).double()
    with pytest.raises(TypeError, match="'weight' has dtype torch.float64"):
        ParameterLayout(model)


def test_refuses_wrong_vector():
    layout = ParameterLayout(ToyModel(3))
    with pytest.raises(ValueError, match="length 5"):
        layout.load_into(ToyModel(3), torch.zeros(7))
    with pytest.raises(ValueError, match="float32"):
        layout.load_into(ToyModel(3), torch.zeros(5, dtype=torch.float64))


def test_refuses_model_that_does_not_fit():
    layout = ParameterLayout(ToyModel(3))
    with pytest.raises(ValueError, match="linear.weight"):
        layout.flatten(ToyModel(4))


def test_refuses_nothing_shared_and_bad_local_only():
    with pytest.raises(ValueError, match="no shared trainable parameter"):
        ParameterLayout(ToyModel(3), local_only=("*",))
    with pytest.raises(TypeError, match="local_only"):
        ParameterLayout(ToyModel(3), local_only="private_*")  # a bare string is ambiguous
