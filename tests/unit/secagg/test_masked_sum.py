"""``MaskedSum``: the public masked backend (beyond the shared contract suite)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import DropoutError, MaskedSum, OverflowRiskError, SecureSum, Stage


def _updates(n, d, seed, bound=1.0):
    rng = np.random.default_rng(seed)
    return {f"c{i:02d}": rng.uniform(-bound, bound, d).astype(np.float32) for i in range(n)}


def _exact(updates, ids):
    return np.sum([updates[c].astype(np.float64) for c in ids], axis=0)


class _Rademacher:
    """Integer noise of +-1 step per coordinate (a stand-in for Skellam / discrete Gaussian)."""

    def __init__(self) -> None:
        self.drawn: list[np.ndarray] = []

    def sample(self, size, *, scale, rng):
        out = rng.choice(np.array([-1, 1], dtype=np.int64), size)
        self.drawn.append(out)
        return out

    def sum_bound(self, *, scale, num_clients):
        return float(num_clients)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(2, 10),
    d=st.integers(1, 50),
    graph=st.sampled_from(["complete", "secagg+"]),
    data=st.data(),
)
def test_decoded_sum_within_stated_bound_under_dropouts(n, d, graph, data):
    updates = _updates(n, d, seed=n * 31 + d)
    ids = sorted(updates)
    backend = MaskedSum(value_bound=1.0, max_clients=12, graph=graph)
    plan = backend.plan(n)
    dropouts = data.draw(st.dictionaries(st.sampled_from(ids), st.sampled_from(list(Stage)), max_size=plan.tolerated_dropouts))
    result = backend.aggregate(updates, round_index=3, rng=np.random.default_rng(0), dropouts=dropouts)
    counted = [c for c in ids if dropouts.get(c, Stage.UNMASK) > Stage.MASKED_INPUT]
    assert result.contributors == tuple(counted)
    assert result.dropped == tuple(sorted(dropouts))
    assert result.max_abs_error == backend.encoder.error_bound(len(counted))
    assert np.max(np.abs(result.total - _exact(updates, counted))) <= result.max_abs_error + 1e-12


def test_same_generator_gives_the_same_total_whatever_the_masks():
    updates = _updates(5, 40, seed=1)
    backend = MaskedSum(value_bound=1.0, max_clients=8)
    a = backend.aggregate(updates, round_index=1, rng=np.random.default_rng(4))
    b = backend.aggregate(updates, round_index=2, rng=np.random.default_rng(4))
    assert np.array_equal(a.total, b.total)  # masks are fresh, the decoded sum is exact


def test_bits_64_has_a_much_finer_bound():
    updates = _updates(4, 30, seed=2)
    r32 = MaskedSum(value_bound=1.0, max_clients=8).aggregate(updates, round_index=1, rng=np.random.default_rng(0))
    r64 = MaskedSum(value_bound=1.0, max_clients=8, bits=64).aggregate(updates, round_index=1, rng=np.random.default_rng(0))
    assert r64.max_abs_error < r32.max_abs_error * 1e-6
    assert np.max(np.abs(r64.total - _exact(updates, sorted(updates)))) <= r64.max_abs_error + 1e-12
    # 4 more bytes per coordinate per client, nothing else changes in the masked input
    assert r64.bytes_up["masked_input"] - r32.bytes_up["masked_input"] == 4 * 30 * 4


def test_upload_is_about_b_bits_per_coordinate():
    d = 5000
    result = MaskedSum(value_bound=1.0, max_clients=8).aggregate(
        _updates(6, d, seed=3), round_index=1, rng=np.random.default_rng(0)
    )
    per_client = result.bytes_up["masked_input"] / 6
    assert 4 * d < per_client < 4 * d + 64


def test_integer_noise_is_added_before_masking_and_excluded_from_the_bound():
    noise = _Rademacher()
    backend = MaskedSum(value_bound=1.0, max_clients=8, integer_noise=noise)
    assert backend.encoder.noise_headroom == 8
    updates = _updates(5, 64, seed=4)
    result = backend.aggregate(updates, round_index=1, rng=np.random.default_rng(0), dropouts={"c01": Stage.SHARE_KEYS})
    counted = [c for c in sorted(updates) if c != "c01"]
    ids = sorted(updates)
    noise_sum = np.sum([noise.drawn[ids.index(c)] for c in counted], axis=0) / backend.encoder.scale
    assert np.max(np.abs(result.total - _exact(updates, counted) - noise_sum)) <= result.max_abs_error + 1e-12
    assert np.max(np.abs(noise_sum)) > 0  # the noise is really there
    assert backend.describe()["integer_noise"] == "_Rademacher"


def test_refuses_values_beyond_the_bound_naming_client_and_value():
    updates = _updates(3, 8, seed=5)
    updates["c01"][2] = 1.25
    with pytest.raises(ValueError, match=r"c01.*1\.25.*value_bound=1\.0"):
        MaskedSum(value_bound=1.0, max_clients=4).aggregate(updates, round_index=1, rng=np.random.default_rng(0))


def test_refuses_more_clients_than_max_clients():
    with pytest.raises(OverflowRiskError, match="round of 5 clients exceeds max_clients=4"):
        MaskedSum(value_bound=1.0, max_clients=4).aggregate(_updates(5, 3, seed=6), round_index=1, rng=np.random.default_rng(0))


def test_refuses_overflowing_settings_at_construction():
    with pytest.raises(OverflowRiskError, match="max_clients=4294967296"):
        MaskedSum(value_bound=1.0, max_clients=2**32)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(graph="ring"), r"graph must be one of \('complete', 'secagg\+'\), got 'ring'"),
        (dict(degree=4), "degree applies to graph='secagg\\+' only"),
        (dict(graph="secagg+", degree=3), "degree must be an even int >= 2, got 3"),
        (dict(threshold=0), "threshold must be an int >= 1 or None, got 0"),
        (dict(threshold=13), "threshold=13 exceeds max_clients=12"),
        (dict(dropout_rate=1.5), r"dropout_rate must be in \[0, 1\)"),
        (dict(value_bound=-1.0), "value_bound must be a finite number > 0"),
    ],
)
def test_bad_construction_arguments(kwargs, pattern):
    args = dict(value_bound=1.0, max_clients=12) | kwargs
    with pytest.raises(ValueError, match=pattern):
        MaskedSum(**args)


def test_explicit_threshold_is_used_and_impossible_ones_refused():
    backend = MaskedSum(value_bound=1.0, max_clients=12, threshold=7)
    updates = _updates(8, 5, seed=7)
    result = backend.aggregate(updates, round_index=1, rng=np.random.default_rng(0), dropouts={"c00": Stage.UNMASK})
    assert backend.describe()["threshold"] == 7
    assert len(result.contributors) == 8
    with pytest.raises(DropoutError, match="threshold=7"):
        backend.aggregate(
            updates, round_index=2, rng=np.random.default_rng(0), dropouts={"c00": Stage.UNMASK, "c01": Stage.UNMASK}
        )
    with pytest.raises(ValueError, match="threshold=7 is impossible for a round of 5 clients"):
        backend.aggregate(_updates(5, 5, seed=8), round_index=3, rng=np.random.default_rng(0))


def test_secagg_plus_with_a_sparse_graph():
    backend = MaskedSum(value_bound=1.0, max_clients=40, graph="secagg+", degree=6, threshold=3)
    updates = _updates(30, 20, seed=9)
    dropouts = {"c03": Stage.MASKED_INPUT, "c10": Stage.UNMASK, "c20": Stage.ADVERTISE_KEYS}
    result = backend.aggregate(updates, round_index=1, rng=np.random.default_rng(0), dropouts=dropouts)
    info = backend.describe()
    assert (info["planned_graph"], info["degree"], info["threshold"]) == ("secagg+", 6, 3)
    counted = [c for c in sorted(updates) if c not in ("c03", "c20")]
    assert result.contributors == tuple(counted)
    assert np.max(np.abs(result.total - _exact(updates, counted))) <= result.max_abs_error + 1e-12
    # sparse: each client shares to 6 neighbours, not 29
    assert result.bytes_up["share_bundle"] < 30 * 7 * 250


def test_signed_keys_round():
    backend = MaskedSum(value_bound=1.0, max_clients=6, signed_keys=True)
    updates = _updates(4, 10, seed=10)
    r1 = backend.aggregate(updates, round_index=1, rng=np.random.default_rng(0))
    assert np.max(np.abs(r1.total - _exact(updates, sorted(updates)))) <= r1.max_abs_error + 1e-12
    assert backend.describe()["signed_keys"] is True
    assert "Ed25519-signed" in backend.trust_model


def test_describe_and_trust_model():
    backend = MaskedSum(value_bound=0.5, max_clients=12)
    assert isinstance(backend, SecureSum)
    info = backend.describe()
    for key in ("mode", "bits", "scale", "graph", "degree", "threshold", "signed_keys", "guarantee"):
        assert key in info
    assert info["mode"] == "masked" and info["bits"] == 32
    assert info["scale"] == backend.encoder.scale
    assert (info["degree"], info["threshold"]) == (11, 9)  # planned for max_clients before any round
    assert "any 3 clients may drop" in info["guarantee"]
    assert "honest-but-curious" in backend.trust_model and "Unsigned mode" in backend.trust_model
    assert "honest-but-curious" in info["guarantee"]  # the plan says it too
    signed = MaskedSum(value_bound=0.5, max_clients=12, signed_keys=True)
    assert "consistency check" in signed.trust_model and "honest-but-curious" not in signed.trust_model
    assert "against an active server that lies about dropouts and survivors: safe" in signed.describe()["guarantee"]


@pytest.mark.parametrize(
    "dropouts, exc, pattern",
    [
        ({"zz": Stage.UNMASK}, ValueError, "'zz', which is not among"),
        ({"c00": 7}, ValueError, "dropout stage of 'c00' must be a Stage"),
    ],
)
def test_bad_dropouts(dropouts, exc, pattern):
    with pytest.raises(exc, match=pattern):
        MaskedSum(value_bound=1.0, max_clients=4).aggregate(
            _updates(3, 4, seed=11), round_index=1, rng=np.random.default_rng(0), dropouts=dropouts
        )


def test_rng_must_be_a_generator():
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        MaskedSum(value_bound=1.0, max_clients=4).aggregate(_updates(3, 4, seed=12), round_index=1, rng=np.random.RandomState(0))


def test_integer_entry_point_shows_the_servers_view():
    backend = MaskedSum(value_bound=1.0, max_clients=4)
    updates = _updates(3, 1000, seed=13)
    words = {c: backend.encode_client(u, rng=np.random.default_rng(i)) for i, (c, u) in enumerate(sorted(updates.items()))}
    result = backend.aggregate_integers(words, round_index=1, keep_masked=True)
    for cid, view in result.masked_views.items():
        # the masked view is unrelated to the true update: about half the bits differ
        diff = np.unpackbits((view ^ words[cid]).view(np.uint8)).mean()
        assert 0.45 < diff < 0.55
    total = backend.encoder.decode(result.total, num_clients=3)
    assert np.max(np.abs(total - _exact(updates, sorted(updates)))) <= backend.encoder.error_bound(3)
