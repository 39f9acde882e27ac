"""Privacy budget report: built from the ledger; a plain-language summary, who sees what, then the detail."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import struct

import numpy as np
import pytest

import dp

TRUST = "masked: the server sees only sums of at least 3 clients <b>honest-but-curious</b>"


def central_ledger(rounds: int = 4) -> dp.Ledger:
    """Central noise with adaptive clipping (count joined with the round's noise) and DP-SGD on two clients."""
    rng = np.random.default_rng(0)
    ledger = dp.Ledger()
    clip = dp.AdaptiveClip(initial_bound=1.0, count_noise_multiplier=20.0)
    for r in range(rounds):
        ledger.record(
            dp.CentralGaussian(noise_multiplier=1.2, clip_bound=clip.bound).event(
                round_index=r, participants=5, survivors=4 if r == 1 else 5, sample_rate=0.2
            )
        )
        _, ev = clip.update(
            clip.noise_count(3, rng=rng), expected_clients=5, participants=5, survivors=5, round_index=r, sample_rate=0.2
        )
        ledger.record(ev)
        for cid in ("c1", "c2"):
            ledger.record(
                dp.SampleLevelEvent(
                    client_id=cid,
                    round_index=r,
                    noise_multiplier=1.0,
                    max_grad_norm=1.0,
                    sample_rate=0.05,
                    steps=10 if cid == "c1" else 30,
                    clipping="embedding",
                )
            )
    return ledger


def sample_ledger(clients: int = 3, rounds: int = 5) -> dp.Ledger:
    return dp.Ledger(
        dp.SampleLevelEvent(client_id=f"silo-{c}", round_index=r, noise_multiplier=1.1, max_grad_norm=1.0,
                            sample_rate=0.2, steps=20 + c)
        for r in range(rounds) for c in range(clients)
    )  # fmt: skip


def build(ledger, **kw):
    args = dict(
        delta=1e-5,
        mode="masked",
        trust_model=TRUST,
        secure_aggregation={"threshold": 3, "clients": 5, "bits": 32},
        dropouts={1: ["c5"]},
        reveals=[dp.Reveal(round_index=3, what="model of c2 (selected)", why="covered by sample-level DP")],
        utility={r: {"accuracy": 0.5 + 0.1 * r} for r in range(4)},
        budget=dp.PrivacyBudget(epsilon=10.0, delta=1e-5),
        generated_at="2026-01-01T00:00:00+00:00",
    )
    args.update(kw)
    return dp.PrivacyReport(ledger, **args)


def png_size(b64: str) -> tuple[int, int]:
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", raw[16:24])


def test_json_report_is_computed_from_the_ledger():
    ledger = central_ledger()
    report = build(ledger, audited_epsilon_lower_bound=0.2)
    data = json.loads(report.to_json())
    assert data["schema"] == dp.REPORT_SCHEMA == "privfl.dp.report/2"
    assert data["generated_at"] == "2026-01-01T00:00:00+00:00"
    client = data["client_level"]
    assert data["accountant"] == "pld" and client["accountant_used"] == "pld"
    assert client["epsilon"] == pytest.approx(dp.epsilon(ledger, delta=1e-5))
    assert client["cross_check"] == {
        "accountant": "rdp",
        "epsilon": pytest.approx(dp.epsilon(ledger, delta=1e-5, accountant="rdp")),
    }
    assert client["cross_check"]["epsilon"] >= client["epsilon"] and client["cross_check_below_headline"] is False
    assert client["by_accountant"]["tightest"] == pytest.approx(
        min(v for k, v in client["by_accountant"].items() if k != "tightest")
    )
    curve = client["epsilon_over_rounds"]
    assert [p["round"] for p in curve] == [0, 1, 2, 3]
    assert all(a["epsilon"] < b["epsilon"] for a, b in zip(curve, curve[1:]))
    assert curve[-1]["epsilon"] == client["epsilon"]
    per = data["sample_level"]["per_client"]
    expected = dp.sample_level_epsilons(ledger, delta=1e-5)
    assert {c: v["epsilon"] for c, v in per.items()} == pytest.approx(expected)
    assert per["c2"]["steps"] == 120 and per["c2"]["rounds"] == 4
    assert data["sample_level"]["max_epsilon"] == pytest.approx(max(expected.values()))
    assert data["sample_level"]["max_epsilon_client"] == "c2"
    mech = {m["mechanism"]: m for m in data["mechanisms"]}
    assert mech["gaussian"]["uses"] == 4 and mech["gaussian"]["survivors"] == [4, 5]
    assert mech["quantile"]["parameters"]["noise_multiplier"] == 20.0
    assert mech["dp_sgd"]["clients"] == 2 and mech["dp_sgd"]["steps"] == 160
    assert (mech["dp_sgd"]["unit"], mech["gaussian"]["unit"], mech["quantile"]["unit"]) == ("record", "client", "client")
    budget = data["budget"]
    assert budget["level"] == "all" and budget["spent_by_level"]["client"] == pytest.approx(client["epsilon"])
    assert budget["spent"] == pytest.approx(max(client["epsilon"], data["sample_level"]["max_epsilon"]))
    assert data["secure_aggregation"]["parameters"]["threshold"] == 3
    assert data["secure_aggregation"]["dropouts"] == [{"round": 1, "dropped": 1, "ids": ["c5"]}]
    assert data["reveals"] == [{"round": 3, "what": "model of c2 (selected)", "why": "covered by sample-level DP"}]
    assert data["utility"][2] == {"round": 2, "metrics": {"accuracy": pytest.approx(0.7)}}
    assert data["audit"]["ran"] is True and data["audit"]["lower_bound"] == 0.2
    assert data["mode"] == {"name": "masked", "trust_model": TRUST}
    assert any("Adaptive clipping" in a and "one mechanism" in a for a in data["assumptions"])
    assert data["provenance"]["library"] == "privfl" and "library_version" in data["provenance"]
    restored = dp.Ledger(dp.event_from_dict(e) for e in data["events"])
    assert restored.events == ledger.events


def test_one_epsilon_per_run_history_headline_and_prose_agree():
    ledger = central_ledger()
    for accountant in ("pld", "rdp"):
        data = build(ledger, accountant=accountant).data
        client = data["client_level"]
        headline = client["epsilon"]
        assert headline == dp.epsilon(ledger, delta=1e-5, accountant=accountant)
        assert client["epsilon_over_rounds"][-1]["epsilon"] == headline
        (words,) = [g for g in data["summary"]["guarantees"] if g["level"] == "client"]
        assert words["epsilon"] == headline and words["accountant"] == accountant
        assert f"epsilon = {headline:.3g}" in words["in_words"]
        sample = data["sample_level"]
        assert sample["epsilon_over_rounds"][-1]["max_epsilon"] == sample["max_epsilon"]


def test_summary_comes_first_in_plain_language_then_who_sees_what_then_detail():
    report = build(
        central_ledger(),
        unit_of_privacy="one user's ratings inside a silo",
        non_private_releases=[
            "test HR@10 every round, on held-out private data",
            {"what": "exact dataset sizes", "note": "the weight coordinate"},
        ],
        seed_derivable=True,
        provenance={"config_sha256": "ab" * 32, "data_sha256": "cd" * 32, "model_sha256": "ef" * 32},
    )
    page = report.to_html()
    order = [
        page.index(h)
        for h in (
            "<h2>Summary</h2>",
            "<h2>What each party sees</h2>",
            "<h2>Detail</h2>",
            "<h3>Epsilon over rounds</h3>",
            "<h3>Provenance</h3>",
        )
    ]
    assert order == sorted(order)
    summary = page[order[0] : order[1]]
    for needle in (
        "Who is protected:</b> one user&#x27;s ratings inside a silo",
        "Against whom:",
        "NOT against the server",
        "except with a probability of at most 1e-05 (about 1 in 100,000)",
        "test HR@10 every round, on held-out private data",
        "exact dataset sizes (the weight coordinate)",
        "Reproducible simulation: the noise is derivable from the seed; the guarantee holds only against "
        "whoever does not know it.",
        "model of c2 (selected)",
        "No privacy audit ran for this run.",
    ):
        assert needle in summary, needle
    data = report.data
    assert data["seed_derivable"] is True and data["non_private_releases"][1] == {
        "what": "exact dataset sizes",
        "note": "the weight coordinate",
    }
    assert [p["party"] for p in data["parties"]] == ["server", "other clients", "key holder", "whoever receives the model"]
    assert "sum before the noise is added" in data["parties"][0]["sees"]
    assert data["provenance"]["config_sha256"] == "ab" * 32 and ("cd" * 32) in page
    custom = build(central_ledger(), parties=[{"party": "server", "sees": "only masked sums"}]).data["parties"]
    assert custom == [{"party": "server", "sees": "only masked sums"}]
    # without a seed statement the summary does not claim one
    assert "Reproducible simulation" not in build(central_ledger()).to_html()


def test_sample_level_run_has_epsilon_over_rounds_and_a_readable_per_client_chart():
    ledger = sample_ledger(clients=3)
    report = build(ledger, budget=dp.PrivacyBudget(epsilon=8.0, delta=1e-5, level="sample"), dropouts=None, reveals=())
    data = report.data
    assert data["client_level"] is None
    curve = data["sample_level"]["epsilon_over_rounds"]
    assert [p["round"] for p in curve] == list(range(5))
    assert all(a["max_epsilon"] < b["max_epsilon"] for a, b in zip(curve, curve[1:]))
    assert curve[-1]["max_epsilon"] == data["sample_level"]["max_epsilon"]
    page = report.to_html()
    assert "No differential-privacy events" not in page
    images = dict(re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page))
    assert set(images) == {"epsilon over rounds", "per-client sample-level epsilon", "utility over rounds"}
    # the per-client chart grows with the number of clients, so every label has its own row
    small = png_size(images["per-client sample-level epsilon"])[1]
    many = build(sample_ledger(clients=30, rounds=1), dropouts=None, reveals=()).to_html()
    big = png_size(
        dict(re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', many))[
            "per-client sample-level epsilon"
        ]
    )[1]
    assert big > 2 * small
    assert "silo-29" in many


def test_utility_chart_takes_a_non_dp_reference():
    without = build(central_ledger()).to_html()
    assert "No non-DP reference was given to compare with." in without
    report = build(central_ledger(), utility_reference={"accuracy": 0.95})
    assert report.data["utility_reference"] == {"accuracy": 0.95}
    assert "No non-DP reference" not in report.to_html()


def test_backend_parameters_are_rendered_as_readable_fields():
    report = build(
        central_ledger(),
        secure_aggregation={"threshold": 3, "encoder": {"bits": 32, "scale_factor": 2048.0}, "graph": "complete"},
    )
    page = report.to_html()
    section = page[page.index("<h3>Secure aggregation</h3>") : page.index("<h4>Observed dropouts</h4>")]
    assert "encoder › bits" in section and "encoder › scale factor" in section and "2048" in section
    assert "{" not in section and "&#x27;" not in section  # no raw dict dump


def test_distributed_noise_report_names_the_accountant_it_used_and_flags_short_rounds():
    noise = dp.SkellamNoise(noise_multiplier=1.0, clip_bound=1.0, dim=100, min_clients=4)
    ledger = dp.Ledger(
        [
            noise.event(round_index=0, scale=128.0, participants=5, survivors=5, sampling="fixed_size", sample_rate=0.5),
            noise.event(round_index=1, scale=128.0, participants=5, survivors=3, sampling="fixed_size", sample_rate=0.5),
        ]
    )
    data = json.loads(build(ledger, dropouts={1: 2}, reveals=()).to_json())
    client = data["client_level"]
    assert data["accountant"] == "pld" and client["accountant_used"] == "rdp" and client["cross_check_accountant"] == "prv"
    assert client["by_accountant"]["pld"] is None and client["by_accountant"]["prv"] is None
    assert client["epsilon"] == pytest.approx(dp.epsilon(ledger, delta=1e-5))
    assert data["secure_aggregation"]["rounds_below_min_clients"] == [{"round": 1, "survivors": 3, "min_clients": 4}]
    assert data["secure_aggregation"]["dropouts"] == [{"round": 1, "dropped": 2, "ids": None}]
    text = " ".join(data["assumptions"])
    assert "accounted as Poisson sampling" in text and "WARNING: 1 round(s)" in text
    assert any("as if it were Poisson" in x for x in data["summary"]["not_covered"])
    assert any("holds against the server too" in x for x in data["summary"]["protected_against"])
    assert data["sample_level"] is None
    with pytest.raises(dp.AccountingError, match="Gaussian mechanisms only"):
        build(ledger, accountant="prv")


def test_html_is_self_contained_with_plots_and_escaped_text(tmp_path):
    report = build(central_ledger())
    page = report.to_html()
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    assert not re.search(r"(src|href)=\"(https?:|//|file:)", page)
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [alt for alt, _ in images] == ["epsilon over rounds", "per-client sample-level epsilon", "utility over rounds"]
    for _, b64 in images:
        png_size(b64)
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
    page = report.to_html()
    assert "No differential-privacy mechanism was recorded" in page and "No one: no differential-privacy" in page
    assert data["summary"]["unit_of_privacy"].startswith("nothing")


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
        (dict(unit_of_privacy=""), dp.DPValueError, r"unit_of_privacy must be a non-empty str, got ''"),
        (
            dict(non_private_releases="metrics"),
            dp.DPTypeError,
            r"non_private_releases must be a list of str or mappings, got str",
        ),
        (dict(non_private_releases=[{"what": "x", "why": "y"}]), dp.DPValueError, r"non_private_releases\[0\] takes what/note"),
        (dict(non_private_releases=[3]), dp.DPTypeError, r"non_private_releases\[0\] must be a str or a mapping"),
        (dict(parties=[{"party": "server"}]), dp.DPValueError, r"parties\[0\] must be a mapping with exactly the keys"),
        (dict(seed_derivable="yes"), dp.DPTypeError, r"seed_derivable must be a bool, got 'yes'"),
        (dict(utility_reference={"auc": "high"}), dp.DPTypeError, r"utility_reference\['auc'\] must be a real number"),
        (dict(audit=3.0), dp.DPTypeError, r"audit must be a dp.audit.AuditResult or its to_dict\(\), got float"),
        (dict(provenance={"config": object()}), dp.DPTypeError, r"provenance\['config'\] must be JSON data"),
    ],
)
def test_bad_report_arguments_are_refused(changes, exc, match):
    with pytest.raises(exc, match=match):
        build(dp.Ledger(), **changes)


def test_mechanism_table_states_each_mechanisms_unit_of_privacy():
    """A user-level DP-SGD row must not read as record-level (nor the other way round)."""
    user = [dataclasses.replace(e, unit="user") for e in sample_ledger(clients=2, rounds=2).events]
    record = [dataclasses.replace(e, client_id="other-silo") for e in sample_ledger(clients=1, rounds=1).events]
    ledger = dp.Ledger([*user, *record])
    report = build(ledger)
    units = sorted(m["unit"] for m in report.data["mechanisms"])
    assert units == ["record", "user"]  # the same mechanism and parameters, two units: two rows
    page = report.to_html()
    assert "<th>unit of privacy</th>" in page and "<td>user</td>" in page and "<td>record</td>" in page
