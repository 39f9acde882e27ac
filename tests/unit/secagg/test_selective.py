"""Selective encryption: the contract suite on split backends, and the record of what went where."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import BFVSum, CKKSSum, PlaintextSum, SecureSum, SelectiveSum, select_by_name, select_indices, select_top_fraction
from secagg.selective import Selection
from tests.unit.secagg import test_contract as contract

SELECTIVE_BACKENDS = {
    # coordinate 0 encrypted, the rest in plaintext (all encrypted when d = 1)
    "ckks+plaintext": lambda: SelectiveSum(encrypted=CKKSSum(value_bound=1.0, max_clients=12), rest=PlaintextSum(), mask=[0]),
    # nothing encrypted: everything takes the rest path
    "none+plaintext": lambda: SelectiveSum(
        encrypted=CKKSSum(value_bound=1.0, max_clients=12), rest=PlaintextSum(), mask=np.zeros(0, dtype=np.int64)
    ),
    "bfv+ckks": lambda: SelectiveSum(
        encrypted=BFVSum(value_bound=1.0, max_clients=12), rest=CKKSSum(value_bound=1.0, max_clients=12), mask=[0]
    ),
}


@pytest.fixture(params=sorted(SELECTIVE_BACKENDS))
def backend(request) -> SecureSum:
    return SELECTIVE_BACKENDS[request.param]()


# The shared contract suite, re-run against selective backends (the fixture above replaces its own).
test_is_a_secure_sum = contract.test_is_a_secure_sum
test_sum_equals_plaintext_within_stated_bound = contract.test_sum_equals_plaintext_within_stated_bound
test_dropouts_at_each_stage = contract.test_dropouts_at_each_stage
test_refuses_nan = contract.test_refuses_nan
test_refuses_length_mismatch = contract.test_refuses_length_mismatch
test_refuses_empty_round = contract.test_refuses_empty_round

LAYOUT = {"embedding": 1000, "attn.q": 400, "attn.k": 400, "head.bias": 8}


def _updates(n: int, d: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"c{i}": rng.uniform(-1, 1, d) for i in range(n)}


def test_by_name_encrypts_exactly_those_parameters_and_records_them():
    selection = select_by_name(LAYOUT, ["attn.k", "head.bias"])
    assert selection.size == 1808 and selection.names == ("attn.k", "head.bias")
    backend = SelectiveSum(encrypted=CKKSSum(value_bound=1.0, max_clients=5), rest=PlaintextSum(), mask=selection)
    updates = _updates(4, 1808)
    result = backend.aggregate(updates, round_index=0, rng=np.random.default_rng(0))
    exact = np.sum(list(updates.values()), axis=0)
    assert np.max(np.abs(result.total - exact)) <= result.max_abs_error
    # the plaintext part is exact; only the encrypted coordinates carry CKKS error
    rest = ~selection.mask(1808)
    assert np.array_equal(result.total[rest], exact[rest])
    assert set(result.bytes_up) == {"public_context", "encrypted/ciphertext", "encrypted/decryption", "rest/update"}
    assert result.bytes_up["rest/update"] == 4 * (27 + 8 * (1808 - 408))  # per client: 27-byte header (id "cN"), float64 payload
    record = backend.describe()["selection"]
    assert record["encrypted_ranges"] == [[1400, 1808]]
    assert record["names"] == ["attn.k", "head.bias"] and record["criterion"] == "by parameter name"
    assert record["encrypted_count"] == 408 and record["rest_count"] == 1400
    assert backend.describe()["encrypted"]["mode"] == "ckks" and backend.describe()["rest"]["mode"] == "plaintext"
    assert "'ckks' path" in backend.trust_model and "'plaintext' path" in backend.trust_model


def test_by_name_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"names \['attn\.v'\] are not in the layout; known names: \['embedding'"):
        select_by_name(LAYOUT, ["attn.v"])
    with pytest.raises(ValueError, match="layout size of 'x' must be a positive int"):
        select_by_name({"x": 0}, [])


@settings(max_examples=30, deadline=None)
@given(
    scores=st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=300),
    fraction=st.floats(min_value=0.0, max_value=1.0),
)
def test_top_fraction_takes_the_largest_scores(scores, fraction):
    scores = np.array(scores)
    selection = select_top_fraction(scores, fraction=fraction, criterion="|aggregated sensitivity|")
    k = int(np.ceil(round(fraction * scores.size, 9)))
    assert selection.indices.size == k
    mask = selection.mask(scores.size)
    if 0 < k < scores.size:
        assert np.abs(scores[mask]).min() >= np.abs(scores[~mask]).max()
    assert "|aggregated sensitivity|" in selection.criterion


def test_top_fraction_count_is_not_fooled_by_float_rounding():
    assert select_top_fraction(np.arange(100.0), fraction=0.07).indices.size == 7
    assert select_top_fraction(np.arange(100.0), fraction=0.071).indices.size == 8
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\], got 1.5"):
        select_top_fraction(np.arange(3.0), fraction=1.5)


def test_scattered_selection_is_recorded_bit_exactly():
    scores = np.random.default_rng(1).normal(size=5000)
    selection = select_top_fraction(scores, fraction=0.2)
    record = selection.record()
    assert "encrypted_ranges" not in record  # too many runs to list
    packed = base64.b64decode(record["encrypted_mask_packbits_base64"])
    unpacked = np.unpackbits(np.frombuffer(packed, dtype=np.uint8))[:5000].astype(bool)
    assert np.array_equal(unpacked, selection.mask(5000))
    assert record["encrypted_fraction"] == pytest.approx(0.2)


def test_selective_encryption_uploads_only_the_selected_fraction():
    d = 10 * 4096
    updates = _updates(3, d)
    full = CKKSSum(value_bound=1.0, max_clients=5).aggregate(updates, round_index=0, rng=np.random.default_rng(0))
    selection = select_top_fraction(np.abs(sum(updates.values())), fraction=0.1, criterion="|previous aggregate|")
    part = SelectiveSum(encrypted=CKKSSum(value_bound=1.0, max_clients=5), rest=PlaintextSum(), mask=selection)
    result = part.aggregate(updates, round_index=0, rng=np.random.default_rng(0))
    assert result.bytes_up["encrypted/ciphertext"] <= 0.15 * full.bytes_up["ciphertext"]
    assert np.max(np.abs(result.total - full.total)) <= result.max_abs_error + full.max_abs_error


def test_mask_forms_and_mismatches():
    as_bool = select_indices(np.array([True, False, True]))
    assert as_bool.size == 3 and as_bool.indices.tolist() == [0, 2]
    assert not as_bool.indices.flags.writeable
    backend = SelectiveSum(encrypted=CKKSSum(value_bound=1.0, max_clients=5), rest=PlaintextSum(), mask=as_bool)
    with pytest.raises(ValueError, match="selection was made for vectors of length 3, got length 4"):
        backend.aggregate(_updates(2, 4), round_index=0, rng=np.random.default_rng(0))
    late = SelectiveSum(encrypted=CKKSSum(value_bound=1.0, max_clients=5), rest=PlaintextSum(), mask=[7])
    with pytest.raises(ValueError, match="index 7 is out of range for length 4"):
        late.aggregate(_updates(2, 4), round_index=0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=">= 0"):
        select_indices([-1])
    with pytest.raises(TypeError, match="bool mask or integer indices"):
        select_indices(np.array([0.5]))
    with pytest.raises(TypeError, match="must implement secagg.SecureSum"):
        SelectiveSum(encrypted=object(), rest=PlaintextSum(), mask=[0])
    assert isinstance(as_bool, Selection)
