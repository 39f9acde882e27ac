"""Events are immutable and validated; the ledger is append-only and round-trips through JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dp


def sample_events() -> list:
    sk = dp.SkellamNoise(noise_multiplier=1.1, clip_bound=0.5, dim=64, min_clients=3)
    dg = dp.DiscreteGaussianNoise(noise_multiplier=0.9, clip_bound=0.5, dim=64, min_clients=3, beta=0.01)
    return [
        dp.GaussianEvent(round_index=0, noise_multiplier=1.0, clip_bound=0.5, sample_rate=0.1, participants=10, survivors=8),
        dp.QuantileEvent(
            round_index=0,
            noise_multiplier=20.0,
            sample_rate=0.1,
            participants=10,
            survivors=8,
            target_quantile=0.5,
            learning_rate=0.2,
            bound_before=1.0,
            bound_after=0.9,
        ),
        dp.SampleLevelEvent(
            client_id="c3",
            round_index=7,
            noise_multiplier=1.1,
            max_grad_norm=1.0,
            sample_rate=0.02,
            steps=120,
            clipping="embedding",
        ),
        sk.event(round_index=1, scale=256.0, participants=5, survivors=4, sample_rate=0.5),
        dg.event(round_index=2, scale=256.0, participants=5, survivors=5, sampling="fixed_size", sample_rate=0.5),
    ]


def test_events_are_frozen():
    for ev in sample_events():
        with pytest.raises(dataclasses.FrozenInstanceError):
            ev.round_index = 99  # type: ignore[misc]


def test_ledger_is_append_only_and_round_trips_without_pickle():
    ledger = dp.Ledger()
    events = sample_events()
    for ev in events:
        assert ledger.record(ev) is ev
    snapshot = ledger.events
    assert isinstance(snapshot, tuple) and snapshot == tuple(events)
    later = dataclasses.replace(events[0], round_index=5)
    ledger.record(later)
    assert snapshot == tuple(events) and len(ledger) == len(events) + 1  # old snapshots do not change
    for name in ("remove", "pop", "clear", "__delitem__", "__setitem__"):
        assert not hasattr(ledger, name)
    text = ledger.to_json()
    data = json.loads(text)
    assert data["schema"] == dp.LEDGER_SCHEMA and len(data["events"]) == len(ledger)
    assert data["events"][3]["derived"]["variance"] == pytest.approx(events[3].variance)
    restored = dp.Ledger.from_json(text)
    assert restored.events == ledger.events
    assert dp.epsilon(restored, delta=1e-5) == dp.epsilon(ledger, delta=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    r=st.integers(0, 10_000),
    z=st.floats(0.01, 100.0, allow_nan=False),
    c=st.floats(1e-4, 1e4),
    q=st.floats(1e-6, 1.0),
    n=st.integers(1, 1000),
    lost=st.integers(0, 1000),
)
def test_gaussian_event_json_round_trip(r, z, c, q, n, lost):
    ev = dp.GaussianEvent(
        round_index=r, noise_multiplier=z, clip_bound=c, sample_rate=q, participants=n, survivors=max(0, n - lost)
    )
    assert dp.event_from_dict(json.loads(json.dumps(dp.event_to_dict(ev)))) == ev


def test_ledger_refuses_foreign_objects_and_bad_json():
    ledger = dp.Ledger()
    with pytest.raises(dp.DPTypeError, match="event must be a dp event .* got dict"):
        ledger.record({"mechanism": "gaussian"})  # type: ignore[arg-type]
    with pytest.raises(dp.DPValueError, match="ledger text is not valid JSON"):
        dp.Ledger.from_json("{")
    with pytest.raises(dp.DPValueError, match=r"ledger schema must be 'privfl.dp.ledger/1', got 'other/2'"):
        dp.Ledger.from_json(json.dumps({"schema": "other/2", "events": []}))
    bad = json.dumps({"schema": dp.LEDGER_SCHEMA, "events": [{"mechanism": "laplace"}]})
    with pytest.raises(dp.DPValueError, match="event mechanism must be one of"):
        dp.Ledger.from_json(bad)
    extra = dp.event_to_dict(sample_events()[0]) | {"epsilon": 1.0}
    with pytest.raises(dp.DPValueError, match=r"unknown fields \['epsilon'\]"):
        dp.event_from_dict(extra)


@pytest.mark.parametrize(
    "changes,exc,match",
    [
        (dict(noise_multiplier=0.0), dp.DPValueError, r"noise_multiplier must be > 0, got 0.0"),
        (dict(clip_bound=-1.0), dp.DPValueError, r"clip_bound must be > 0, got -1.0"),
        (dict(sample_rate=1.5), dp.DPValueError, r"sample_rate must be in \(0, 1\], got 1.5"),
        (dict(round_index=-1), dp.DPValueError, r"round_index must be >= 0, got -1"),
        (dict(round_index=1.0), dp.DPTypeError, r"round_index must be an int, got 1.0"),
        (dict(survivors=11), dp.DPValueError, r"survivors must be <= participants=10, got 11"),
        (dict(sampling="stratified"), dp.DPValueError, r"sampling must be one of \('poisson', 'fixed_size', 'full'\)"),
        (dict(sampling="full"), dp.DPValueError, r"sample_rate must be 1.0 when sampling='full', got 0.1"),
        (dict(noise_multiplier=float("nan")), dp.DPValueError, r"noise_multiplier must be finite, got nan"),
        (dict(level="sample"), dp.DPValueError, r"level must be one of \('client',\), got 'sample'"),
    ],
)
def test_bad_event_parameters_are_refused(changes, exc, match):
    args = dict(round_index=0, noise_multiplier=1.0, clip_bound=1.0, sample_rate=0.1, participants=10, survivors=9)
    args.update(changes)
    with pytest.raises(exc, match=match):
        dp.GaussianEvent(**args)


def test_sample_level_event_requires_a_client():
    with pytest.raises(dp.DPTypeError, match="client_id must be a non-empty str, got ''"):
        dp.SampleLevelEvent(client_id="", round_index=0, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, steps=1)
    with pytest.raises(dp.DPValueError, match=r"clipping must be one of \('default', 'ghost', 'embedding'\)"):
        dp.SampleLevelEvent(
            client_id="a", round_index=0, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, steps=1, clipping="auto"
        )
