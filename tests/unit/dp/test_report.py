"""Privacy budget report: built from the ledger; JSON for machines, self-contained HTML for people."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

import dp

TRUST = "masked: the server sees only sums of at least 3 clients <b>honest-but-curious</b>"


def central_ledger(rounds: int = 4) -> dp.Ledger:
    rng = np.random.default_rng(0)
    ledger = dp.Ledger()
    clip = dp.AdaptiveClip(initial_bound=1.0, count_noise_multiplier=20.0)
    for r in range(rounds):
        ledger.record(dp.CentralGaussian(noise_multiplier=1.2, clip_bound=clip.bound).event(
            round_index=r, participants=5, survivors=4 if r == 1 else 5, sample_rate=0.2))
        _, ev = clip.update(3.0, expected_clients=5, participants=5, survivors=5, round_index=r, rng=rng, sample_rate=0.2)
        ledger.record(ev)
        for cid in ("c1", "c2"):
            ledger.record(dp.SampleLevelEvent(client_id=cid, round_index=r, noise_multiplier=1.0, max_grad_norm=1.0,
                                              sample_rate=0.05, steps=10 if cid == "c1" else 30, clipping="embedding"))
    return ledger


def build(ledger, **kw):
    args = dict(
        delta=1e-5, mode="masked", trust_model=TRUST, secure_aggregation={"threshold": 3, "clients": 5, "bits": 32},
        dropouts={1: ["c5"]}, reveals=[dp.Reveal(round_index=3, what="model of c2 (selected)", why="covered by sample-level DP")],
        utility={r: {"accuracy": 0.5 + 0.1 * r} for r in range(4)},
        budget=dp.PrivacyBudget(epsilon=10.0, delta=1e-5), generated_at="2026-01-01T00:00:00+00:00",
    )
    args.update(kw)
    return dp.PrivacyReport(ledger, **args)


def test_json_report_is_computed_from_the_ledger():
    ledger = central_ledger()
    report = build(ledger, accountant="rdp", audited_epsilon_lower_bound=0.2)
    data = json.loads(report.to_json())
    assert data["schema"] == dp.REPORT_SCHEMA == "privfl.dp.report/1"
    assert data["generated_at"] == "2026-01-01T00:00:00+00:00"
    client = data["client_level"]
    assert client["epsilon"] == pytest.approx(dp.epsilon(ledger, delta=1e-5, accountant="rdp"))
    assert client["cross_check"]["accountant"] == "prv"
    assert client["cross_check"]["epsilon"] == pytest.approx(dp.epsilon(ledger, delta=1e-5, accountant="prv"))
    assert client["by_accountant"]["tightest"] == min(client["by_accountant"]["rdp"], client["by_accountant"]["prv"])
    curve = client["epsilon_over_rounds"]
    assert [p["round"] for p in curve] == [0, 1, 2, 3]
    assert all(a["epsilon"] < b["epsilon"] for a, b in zip(curve, curve[1:]))
    assert curve[-1]["epsilon"] == pytest.approx(client["epsilon"])
    per = data["sample_level"]["per_client"]
    expected = dp.sample_level_epsilons(ledger, delta=1e-5, accountant="rdp")
    assert {c: v["epsilon"] for c, v in per.items()} == pytest.approx(expected)
    assert per["c2"]["steps"] == 120 and per["c2"]["rounds"] == 4
    assert data["sample_level"]["max_epsilon"] == pytest.approx(max(expected.values()))
    mech = {m["mechanism"]: m for m in data["mechanisms"]}
    assert mech["gaussian"]["uses"] == 4 and mech["gaussian"]["survivors"] == [4, 5]
    assert mech["quantile"]["parameters"]["noise_multiplier"] == 20.0
    assert mech["dp_sgd"]["clients"] == 2 and mech["dp_sgd"]["steps"] == 160
    assert data["budget"]["spent"] == pytest.approx(client["epsilon"]) and data["budget"]["remaining"] > 0
    assert data["secure_aggregation"]["parameters"]["threshold"] == 3
    assert data["secure_aggregation"]["dropouts"] == [{"round": 1, "dropped": 1, "ids": ["c5"]}]
    assert data["reveals"] == [{"round": 3, "what": "model of c2 (selected)", "why": "covered by sample-level DP"}]
    assert data["utility"][2] == {"round": 2, "metrics": {"accuracy": pytest.approx(0.7)}}
    assert data["audit"]["lower_bound"] == 0.2
    assert data["mode"] == {"name": "masked", "trust_model": TRUST}
    assert any("Adaptive clipping" in a for a in data["assumptions"])
    restored = dp.Ledger(dp.event_from_dict(e) for e in data["events"])
    assert restored.events == ledger.events


def test_distributed_noise_report_uses_rdp_and_flags_short_rounds():
    noise = dp.SkellamNoise(noise_multiplier=1.0, clip_bound=1.0, dim=100, min_clients=4)
    ledger = dp.Ledger([
        noise.event(round_index=0, scale=128.0, participants=5, survivors=5, sampling="fixed_size", sample_rate=0.5),
        noise.event(round_index=1, scale=128.0, participants=5, survivors=3, sampling="fixed_size", sample_rate=0.5),
    ])
    data = json.loads(build(ledger, dropouts={1: 2}).to_json())
    assert data["accountant"] == "tightest" and data["cross_check_accountant"] == "rdp"
    assert data["client_level"]["by_accountant"]["prv"] is None
    assert data["client_level"]["epsilon"] == pytest.approx(dp.epsilon(ledger, delta=1e-5))
    assert data["secure_aggregation"]["rounds_below_min_clients"] == [{"round": 1, "survivors": 3, "min_clients": 4}]
    assert data["secure_aggregation"]["dropouts"] == [{"round": 1, "dropped": 2, "ids": None}]
    text = " ".join(data["assumptions"])
    assert "accounted as Poisson sampling" in text and "WARNING: 1 round(s)" in text
    assert data["sample_level"] is None
    with pytest.raises(dp.AccountingError, match="Gaussian mechanisms only"):
        build(ledger, accountant="prv")


def test_html_is_self_contained_with_plots_and_escaped_text(tmp_path):
    report = build(central_ledger(), accountant="rdp")
    page = report.to_html()
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    assert not re.search(r"(src|href)=\"(https?:|//|file:)", page)
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [alt for alt, _ in images] == [
        "client-level epsilon over rounds", "per-client sample-level epsilon", "utility over rounds"]
    for _, b64 in images:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "&lt;b&gt;honest-but-curious&lt;/b&gt;" in page and "<b>honest" not in page
    for needle in ("model of c2 (selected)", "covered by sample-level DP", "threshold", "c5", "quantile", "dp_sgd"):
        assert needle in page
    fragment = report._repr_html_()
    assert "<html" not in fragment and fragment in page
    paths = report.save(tmp_path / "out")
    assert paths.json.name == "privacy_report.json" and paths.html.name == "privacy_report.html"
    assert json.loads(paths.json.read_text())["schema"] == dp.REPORT_SCHEMA
    assert paths.html.read_text() == page


def test_empty_ledger_report_says_so():
    report = dp.PrivacyReport(dp.Ledger(), delta=1e-5, mode="plaintext", trust_model="the server sees every update")
    data = json.loads(report.to_json())
    assert data["client_level"] is None and data["sample_level"] is None and data["events"] == []
    assert "No differential-privacy mechanism was recorded" in report.to_html()


@pytest.mark.parametrize(
    "changes,exc,match",
    [
        (dict(delta=2.0), dp.DPValueError, r"delta must be in \(0, 1\), got 2.0"),
        (dict(accountant="gdp"), dp.DPValueError, r"accountant must be one of"),
        (dict(mode=""), dp.DPValueError, r"mode must be a non-empty str, got ''"),
        (dict(trust_model=None), dp.DPValueError, r"trust_model must be a non-empty str, got None"),
        (dict(reveals=[{"round": 1, "what": "m"}]), dp.DPValueError, r"why must be a non-empty str, got None"),
        (dict(reveals=[{"round": 1, "what": "m", "why": "w", "who": "x"}]), dp.DPValueError, r"unknown keys \['who'\]"),
        (dict(reveals=["model"]), dp.DPTypeError, r"reveals must hold Reveal records or mappings, got str"),
        (dict(dropouts={1: 1.5}), dp.DPTypeError, r"dropouts\[1\] must be an int or a sequence of client ids, got 1.5"),
        (dict(utility={0: 0.5}), dp.DPTypeError, r"utility\[0\] must be a mapping metric -> value, got float"),
        (dict(secure_aggregation={"key": object()}), dp.DPTypeError, r"secure_aggregation\['key'\] must be JSON data"),
        (dict(audited_epsilon_lower_bound=-1.0), dp.DPValueError, r"audited_epsilon_lower_bound must be >= 0, got -1.0"),
        (dict(budget=10.0), dp.DPTypeError, r"budget must be a PrivacyBudget or None, got float"),
    ],
)
def test_bad_report_arguments_are_refused(changes, exc, match):
    with pytest.raises(exc, match=match):
        build(dp.Ledger(), **changes)
