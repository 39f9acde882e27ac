"""One contract suite, run against every secure-sum backend (STYLE.md, item 11)."""

from __future__ import annotations

import numpy as np
import pytest

import secagg
from secagg import PlaintextSum, SecureSum, Stage

VALUE_BOUND = 1.0
MAX_CLIENTS = 12


def _plaintext():
    return PlaintextSum()


def _masked():
    return secagg.MaskedSum(value_bound=VALUE_BOUND, max_clients=MAX_CLIENTS)


def _masked_plus():
    return secagg.MaskedSum(value_bound=VALUE_BOUND, max_clients=MAX_CLIENTS, graph="secagg+")


def _ckks():
    return secagg.CKKSSum(value_bound=VALUE_BOUND, max_clients=MAX_CLIENTS, preset="compact")


def _ckks_compact_pk():
    return secagg.CKKSSum(value_bound=VALUE_BOUND, max_clients=MAX_CLIENTS, preset="compact-pk", key_holder="c00")


def _ckks_compat():
    return secagg.CKKSSum(value_bound=VALUE_BOUND, max_clients=MAX_CLIENTS, preset="compat")


def _bfv():
    return secagg.BFVSum(value_bound=VALUE_BOUND, max_clients=MAX_CLIENTS, quant_bits=20)


BACKENDS = {
    "plaintext": _plaintext,
    "masked": _masked,
    "masked-secagg+": _masked_plus,
    "ckks": _ckks,
    "ckks-compact-pk": _ckks_compact_pk,
    "ckks-compat": _ckks_compat,
    "bfv": _bfv,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request) -> SecureSum:
    return BACKENDS[request.param]()


def _updates(n: int, d: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"c{i:02d}": rng.uniform(-VALUE_BOUND, VALUE_BOUND, d).astype(np.float32) for i in range(n)}


def test_is_a_secure_sum(backend):
    assert isinstance(backend, SecureSum)
    assert backend.trust_model.strip()
    assert backend.describe()["mode"] == backend.mode


@pytest.mark.parametrize("n,d", [(3, 1), (5, 257), (10, 3000)])
def test_sum_equals_plaintext_within_stated_bound(backend, n, d):
    updates = _updates(n, d, seed=n * 1000 + d)
    result = backend.aggregate(updates, round_index=1, rng=np.random.default_rng(0))
    exact = np.sum([u.astype(np.float64) for u in updates.values()], axis=0)
    assert result.total.shape == (d,)
    assert result.contributors == tuple(sorted(updates))
    assert result.dropped == ()
    assert result.mode == backend.mode
    assert np.max(np.abs(result.total - exact)) <= result.max_abs_error + 1e-12
    assert sum(result.bytes_up.values()) > 0


@pytest.mark.parametrize("stage", list(Stage))
def test_dropouts_at_each_stage(backend, stage):
    updates = _updates(8, 64, seed=int(stage))
    dropouts = {"c01": stage, "c05": stage}
    result = backend.aggregate(updates, round_index=2, rng=np.random.default_rng(1), dropouts=dropouts)
    counted = [c for c in sorted(updates) if c not in dropouts or stage > Stage.MASKED_INPUT]
    exact = np.sum([updates[c].astype(np.float64) for c in counted], axis=0)
    assert result.contributors == tuple(counted)
    assert result.dropped == ("c01", "c05")
    assert np.max(np.abs(result.total - exact)) <= result.max_abs_error + 1e-12


def test_refuses_nan(backend):
    updates = _updates(4, 16, seed=3)
    updates["c02"][5] = np.nan
    with pytest.raises(ValueError, match="c02.*NaN"):
        backend.aggregate(updates, round_index=1, rng=np.random.default_rng(0))


def test_refuses_length_mismatch(backend):
    updates = _updates(4, 16, seed=4)
    updates["c03"] = updates["c03"][:15]
    with pytest.raises(ValueError, match="c03.*length 15"):
        backend.aggregate(updates, round_index=1, rng=np.random.default_rng(0))


def test_refuses_empty_round(backend):
    with pytest.raises(ValueError, match="at least one"):
        backend.aggregate({}, round_index=1, rng=np.random.default_rng(0))
