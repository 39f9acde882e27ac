"""Privacy budget report: JSON for machines, one self-contained HTML page for people.

Built from the ledger (never from a config) plus what only the caller knows: the
protection mode and its trust model (text from the secure-sum backend), secure-aggregation
parameters and observed dropouts, model reveals, utility per round, and optionally an
audited lower bound on epsilon. Plots are PNGs rendered with matplotlib's Agg canvas and
inlined as base64, so the page needs no network and no files next to it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import numbers
import pathlib
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, NamedTuple, Sequence, cast, overload

from . import _checks as chk
from ._accounting import ACCOUNTANTS, _epsilon_groups, _events_of, _groups, _used, epsilon_by_accountant
from ._budget import PrivacyBudget
from ._errors import AccountingError, DPTypeError, DPValueError, PrivacyAuditWarning
from ._events import (
    DiscreteGaussianEvent,
    Event,
    GaussianEvent,
    QuantileEvent,
    SampleLevelEvent,
    SkellamEvent,
    TuningEvent,
    event_to_dict,
)
from ._ledger import Ledger

__all__ = ["PrivacyReport", "Reveal", "ReportPaths", "REPORT_SCHEMA"]

#: Schema name and version of ``PrivacyReport.to_json`` (bump on incompatible change).
REPORT_SCHEMA = "privfl.dp.report/2"

_MAX_CURVE_POINTS_SLOW = 12  # PLD / PRV curves are evaluated at most at this many rounds


@dataclass(frozen=True, kw_only=True)
class Reveal:
    """A model revealed individually (model selection, output ensembles), and why it was allowed.

    Attributes:
        round_index: the round of the reveal.
        what: what was revealed (e.g. ``"model of client c3 (selected)"``).
        why: why it was allowed (e.g. ``"covered by sample-level DP, epsilon 2.1"`` or
            ``"user opted out of protection"``).
    """

    round_index: int
    what: str
    why: str

    def __post_init__(self) -> None:
        chk.integer("round_index", self.round_index, minimum=0)
        for name in ("what", "why"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise DPValueError(f"{name} must be a non-empty str, got {v!r}")


class ReportPaths(NamedTuple):
    json: pathlib.Path
    html: pathlib.Path


# ----------------------------------------------------------------------------- helpers


def _finite(x: Any) -> Any:
    """JSON-safe value: non-finite floats become the strings "inf" / "-inf" / "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, Mapping):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _json_value(name: str, value: Any) -> Any:
    """Check that a caller-supplied value is plain JSON data (str, number, bool, None, lists, dicts)."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _json_value(f"{name}[{k!r}]", v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(f"{name}[{i}]", v) for i, v in enumerate(value)]
    raise DPTypeError(f"{name} must be JSON data (str, number, bool, None, list, dict), got {type(value).__name__}")


_PARAMS: dict[type, tuple[str, ...]] = {
    GaussianEvent: ("noise_multiplier", "sample_rate", "sampling"),
    QuantileEvent: ("noise_multiplier", "target_quantile", "learning_rate", "sample_rate", "sampling"),
    SampleLevelEvent: ("noise_multiplier", "max_grad_norm", "clipping", "sampling"),
    SkellamEvent: ("target_noise_multiplier", "clip_bound", "scale", "dim", "min_clients", "sample_rate", "sampling"),
    DiscreteGaussianEvent: ("target_noise_multiplier", "clip_bound", "scale", "dim", "min_clients", "sample_rate", "sampling"),
}


def _event_unit(e: Event) -> str:
    """What one use of the mechanism protects: a record or a user of a client, or a client's whole update."""
    if isinstance(e, TuningEvent):  # a search protects what its trials protect
        return _event_unit(e.trial[0]) if e.trial else ("client" if e.level == "client" else "record")
    return getattr(e, "unit", "record" if isinstance(e, SampleLevelEvent) else "client")


def _flat(events: Sequence[Event]) -> list[Event]:
    """The events with each private search replaced by its per-trial events (for descriptions, not accounting)."""
    out: list[Event] = []
    for e in events:
        out.extend(e.trial if isinstance(e, TuningEvent) else (e,))
    return out


def _tuning_rows(events: Sequence[Event]) -> list[dict[str, Any]]:
    rows: dict[tuple, dict[str, Any]] = {}
    for e in events:
        if isinstance(e, TuningEvent):
            key = (e.level, e.distribution, e.score_noise_multiplier)
            row = rows.setdefault(key, {
                "mechanism": "tuning", "level": e.level, "unit": _event_unit(e),
                "parameters": {"distribution": e.distribution.describe(), "expected_trials": e.distribution.mean,
                               "score_noise_multiplier": e.score_noise_multiplier},
                "uses": 0, "rounds": [e.round_index, e.round_index],
            })  # fmt: skip
            row["uses"] += 1
    return list(rows.values())


def _mechanism_rows(events: Sequence[Event]) -> list[dict[str, Any]]:
    """One row per mechanism and setting; a private search's row, then its per-trial mechanisms (``per_trial``)."""
    tuned = _tuning_rows(events)
    trial_rows = _plain_rows(_flat([e for e in events if isinstance(e, TuningEvent)]))
    for row in trial_rows:
        row["per_trial"] = True
    return tuned + trial_rows + _plain_rows([e for e in events if not isinstance(e, TuningEvent)])


def _plain_rows(events: Sequence[Event]) -> list[dict[str, Any]]:
    rows: dict[tuple, dict[str, Any]] = {}
    for e in events:
        names = _PARAMS[type(e)]
        unit = _event_unit(e)
        key = (e.mechanism, e.level, unit) + tuple(getattr(e, n) for n in names)
        row = rows.get(key)
        if row is None:
            row = rows[key] = {
                "mechanism": e.mechanism,
                "level": e.level,
                "unit": unit,
                "parameters": {n: getattr(e, n) for n in names},
                "uses": 0,
                "rounds": [e.round_index, e.round_index],
            }
        row["uses"] += 1
        row["rounds"] = [min(row["rounds"][0], e.round_index), max(row["rounds"][1], e.round_index)]
        if isinstance(e, SampleLevelEvent):
            row.setdefault("clients", set()).add(e.client_id)
            row["steps"] = row.get("steps", 0) + e.steps
            row["sample_rate"] = [
                min(row.get("sample_rate", [1.0])[0], e.sample_rate),
                max(row.get("sample_rate", [0.0])[-1], e.sample_rate),
            ]
        else:
            for n in ("participants", "survivors"):
                v = getattr(e, n)
                cur = row.get(n)
                row[n] = [v, v] if cur is None else [min(cur[0], v), max(cur[1], v)]
        if isinstance(e, (SkellamEvent, DiscreteGaussianEvent)):
            cur = row.get("noise_multiplier_present")
            v = e.noise_multiplier
            row["noise_multiplier_present"] = [v, v] if cur is None else [min(cur[0], v), max(cur[1], v)]
            row["l2_sensitivity"] = e.l2_sensitivity
        if isinstance(e, GaussianEvent):
            cur = row.get("clip_bound")
            row["clip_bound"] = (
                [e.clip_bound, e.clip_bound] if cur is None else [min(cur[0], e.clip_bound), max(cur[1], e.clip_bound)]
            )
        if isinstance(e, QuantileEvent):
            cur = row.get("clip_bound")
            lo, hi = min(e.bound_before, e.bound_after), max(e.bound_before, e.bound_after)
            row["clip_bound"] = [lo, hi] if cur is None else [min(cur[0], lo), max(cur[1], hi)]
    out = []
    for row in rows.values():
        if "clients" in row:
            row["clients"] = len(row["clients"])
        out.append(row)
    return out


def _png(draw: Any, *, width: float = 6.4, height: float = 3.2) -> str:
    """Render ``draw(ax)`` on a fresh Agg figure; return base64 PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    draw(ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.6g}"
    if isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(v, numbers.Real) for v in x):
        return _fmt(x[0]) if x[0] == x[1] else f"{_fmt(x[0])} – {_fmt(x[1])}"
    if isinstance(x, Mapping):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in x.items())
    return str(x)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
.privfl-dp-report{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1d2330;max-width:980px}
.privfl-dp-report h1{font-size:1.5em;margin:.2em 0}
.privfl-dp-report h2{font-size:1.15em;margin:1.2em 0 .4em;border-bottom:1px solid #d8dde6}
.privfl-dp-report table{border-collapse:collapse;margin:.3em 0;font-size:.9em}
.privfl-dp-report th,.privfl-dp-report td{border:1px solid #d8dde6;padding:3px 8px;text-align:left;vertical-align:top}
.privfl-dp-report th{background:#f1f4f8}
.privfl-dp-report .headline{font-size:1.1em;background:#f6f8fb;padding:.6em .8em;border-left:4px solid #3465a4}
.privfl-dp-report .trust{white-space:pre-wrap;background:#fbfbf4;padding:.6em .8em;border-left:4px solid #c4a000}
.privfl-dp-report .warn{color:#a40000}
.privfl-dp-report img{max-width:100%}
"""


# ----------------------------------------------------------------------------- inputs


def _text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DPValueError(f"{name} must be a non-empty str, got {value!r}")
    return value


def _releases(items: Iterable[str | Mapping[str, Any]]) -> list[dict[str, str]]:
    """Non-private releases as ``{"what", "note"}`` records."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise DPTypeError(f"non_private_releases must be a list of str or mappings, got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append({"what": _text(f"non_private_releases[{i}]", item), "note": ""})
        elif isinstance(item, Mapping):
            unknown = set(item) - {"what", "note"}
            if unknown:
                raise DPValueError(f"non_private_releases[{i}] takes what/note, got unknown keys {sorted(unknown)}")
            note = item.get("note", "")
            if not isinstance(note, str):
                raise DPTypeError(f"non_private_releases[{i}]['note'] must be a str, got {type(note).__name__}")
            out.append({"what": _text(f"non_private_releases[{i}]['what']", item.get("what")), "note": note})
        else:
            raise DPTypeError(f"non_private_releases[{i}] must be a str or a mapping what/note, got {type(item).__name__}")
    return out


def _parties(rows: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise DPTypeError(f"parties must be a list of mappings party/sees, got {type(rows).__name__}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or set(row) != {"party", "sees"}:
            raise DPValueError(f"parties[{i}] must be a mapping with exactly the keys 'party' and 'sees', got {row!r}")
        out.append({"party": _text(f"parties[{i}]['party']", row["party"]), "sees": _text(f"parties[{i}]['sees']", row["sees"])})
    return out


def _audit_record(audit: Any, lower_bound: float | None) -> dict[str, Any]:
    if audit is not None and lower_bound is not None:
        raise DPValueError("give either audit= or audited_epsilon_lower_bound=, not both")
    if audit is None and lower_bound is None:
        return {"ran": False}
    if audit is None:
        return {"ran": True, "lower_bound": chk.non_negative("audited_epsilon_lower_bound", lower_bound), "ceiling": None,
                "confidence": None, "canaries": None, "level": None, "method": None, "delta": None, "tested_epsilon": None}  # fmt: skip
    data = audit.to_dict() if hasattr(audit, "to_dict") else audit
    if not isinstance(data, Mapping) or "audited_epsilon_lower_bound" not in data:
        raise DPTypeError(f"audit must be a dp.audit.AuditResult or its to_dict(), got {type(audit).__name__}")
    ceiling = data.get("ceiling")
    return {
        "ran": True,
        "lower_bound": chk.non_negative("audit['audited_epsilon_lower_bound']", data["audited_epsilon_lower_bound"]),
        "ceiling": None if ceiling is None else chk.non_negative("audit['ceiling']", ceiling),
        "confidence": data.get("confidence"),
        "canaries": data.get("canaries"),
        "level": data.get("level"),
        "method": data.get("method"),
        # an audit of the accountant's curve at a delta of its own states the claim it tested
        "delta": data.get("delta"),
        "tested_epsilon": data.get("claimed_epsilon"),
    }


def _provenance(given: Mapping[str, Any] | None) -> dict[str, Any]:
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            lib = version("privfl")
        except PackageNotFoundError:
            lib = "unknown (not installed as a package)"
    except ImportError:  # pragma: no cover
        lib = "unknown"
    out: dict[str, Any] = {"library": "privfl", "library_version": lib}
    try:
        from importlib.metadata import version as _v

        out["dp_accounting_version"] = _v("dp-accounting")
    except Exception:  # pragma: no cover - optional detail
        pass
    for k, v in _json_value("provenance", dict(given or {})).items():
        out[k] = v
    return out


def _humanize(key: str) -> str:
    return key.replace("_", " ").strip()


def _fields(value: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten a backend description into readable (field, value) rows."""
    rows: list[tuple[str, Any]] = []
    for k, v in value.items():
        name = f"{prefix}{_humanize(str(k))}"
        if isinstance(v, Mapping) and v:
            rows.extend(_fields(v, prefix=f"{name} › "))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, (str, int, float)) for x in v) and len(v) != 2:
            rows.append((name, ", ".join(_fmt(x) for x in v)))
        else:
            rows.append((name, "—" if v is None else v))
    return rows


def _eps_words(eps: float, delta: float, unit: str) -> str:
    factor = f"{math.exp(eps):.3g}" if eps < 700 else "an astronomically large number"
    one_in = f"about 1 in {round(1 / delta):,}" if delta <= 0.5 else f"{delta:.3g}"
    return (
        f"epsilon = {eps:.3g}, delta = {delta:.3g}: adding or removing {unit} changes the probability of "
        f"anything the protected outputs show by at most a factor of e^{eps:.3g} ≈ {factor}, except with a "
        f"probability of at most {delta:.3g} ({one_in})."
    )


# ----------------------------------------------------------------------------- report


class PrivacyReport:
    """The privacy budget report of a training run, computed once from the ledger.

    Plain-language summary first (who is protected, against whom, epsilon and delta in words,
    what is and is not covered, each non-private release), then what each party sees, then
    the detail. One epsilon per run: the headline, the last point of the curve and the prose
    are the same figure, from the same accountant.

    Args:
        ledger: the run's ledger (or its events).
        delta: the delta every epsilon is stated at.
        accountant: accountant of the headline figures (``"pld"`` by default; a history the
            chosen one does not cover is accounted as ``dp.accountant_used`` says, and the
            report names the one used); RDP (or PLD when RDP is the headline) is the cross-check.
        mode: name of the protection mode (``"plaintext"``, ``"masked"``, ``"ckks"``...).
        trust_model: the mode's trust-model text, as given by the secure-sum backend.
        secure_aggregation: the backend's parameters (thresholds etc.), JSON data; shown as
            readable fields (pass only what the run really had).
        dropouts: observed dropouts per round: ``{round: ids}`` or ``{round: count}``.
        reveals: individual model reveals (``Reveal`` or mappings with round/what/why).
        utility: ``{round: {metric: value}}``.
        utility_reference: ``{metric: value}`` of the same model without DP (a baseline), drawn
            as dashed lines in the utility chart.
        audit: a ``dp.audit.AuditResult`` (or its ``to_dict()``): lower bound, ceiling, canaries.
        audited_epsilon_lower_bound: only the lower bound of an audit (older callers; give
            ``audit`` or this, not both). One above the claimed epsilon issues a
            ``PrivacyAuditWarning`` and a red banner.
        budget: the run's ``PrivacyBudget``, shown with spend and remainder.
        unit_of_privacy: what one neighbouring change adds or removes, in words (e.g. ``"one
            user's ratings inside a silo"``); default from the ledger's levels.
        non_private_releases: what the run released outside the DP guarantee (str, or
            ``{"what": ..., "note": ...}``), e.g. test metrics on private held-out data.
        parties: rows ``{"party": ..., "sees": ...}`` of the "who sees what" table; default
            rows from the mode and the mechanisms.
        seed_derivable: the run's noise was derivable from a simulation seed.
        provenance: e.g. ``{"config_sha256": ..., "data_sha256": ..., "model_sha256": ...}``;
            the library version is added.
        title: page title.
        generated_at: ISO timestamp to print (default: now, UTC).
        tuning: what only the search knows, for a ledger holding a ``TuningEvent``: JSON data with
            ``space``, ``trials_run``, ``winner`` (its settings and noised score) and ``score`` (how
            the selection score was computed). Keep the other trials out: their release is not covered.

    Raises:
        DPValueError / DPTypeError: a bad argument; AccountingError if ``accountant="prv"``
            meets a non-Gaussian event.
    """

    def __init__(
        self,
        ledger: Ledger | Iterable[Event],
        *,
        delta: float,
        accountant: str = "pld",
        mode: str,
        trust_model: str,
        secure_aggregation: Mapping[str, Any] | None = None,
        dropouts: Mapping[int, Sequence[str] | int] | None = None,
        reveals: Iterable[Reveal | Mapping[str, Any]] = (),
        utility: Mapping[int, Mapping[str, float]] | None = None,
        utility_reference: Mapping[str, float] | None = None,
        audit: Any = None,
        audited_epsilon_lower_bound: float | None = None,
        budget: PrivacyBudget | None = None,
        unit_of_privacy: str | None = None,
        non_private_releases: Iterable[str | Mapping[str, Any]] = (),
        parties: Sequence[Mapping[str, str]] | None = None,
        seed_derivable: bool = False,
        provenance: Mapping[str, Any] | None = None,
        title: str = "Privacy budget report",
        generated_at: str | None = None,
        tuning: Mapping[str, Any] | None = None,
    ) -> None:
        events = _events_of(ledger)
        tuning_events = [e for e in events if isinstance(e, TuningEvent)]
        if tuning is not None and not tuning_events:
            raise DPValueError("tuning= describes a private search, but the ledger holds no TuningEvent")
        d = chk.open_unit("delta", delta)
        acc = chk.one_of("accountant", accountant, ACCOUNTANTS)
        for name, v in (("mode", mode), ("trust_model", trust_model), ("title", title)):
            _text(name, v)
        if budget is not None and not isinstance(budget, PrivacyBudget):
            raise DPTypeError(f"budget must be a PrivacyBudget or None, got {type(budget).__name__}")
        if not isinstance(seed_derivable, bool):
            raise DPTypeError(f"seed_derivable must be a bool, got {seed_derivable!r}")
        if unit_of_privacy is not None:
            _text("unit_of_privacy", unit_of_privacy)
        releases = _releases(non_private_releases)
        party_rows = None if parties is None else _parties(parties)
        audit_rec = _audit_record(audit, audited_epsilon_lower_bound)
        reference = {str(k): chk.real(f"utility_reference[{k!r}]", v) for k, v in (utility_reference or {}).items()}
        if generated_at is None:
            generated_at = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()

        client_events = [e for e in events if e.level == "client"]
        sample_events = [e for e in events if e.level == "sample"]  # DP-SGD events, and a search's per-silo events
        client = self._client_section(client_events, d, acc)
        sample = self._sample_section(sample_events, d, acc)

        drops: list[dict[str, Any]] = []
        for r, dropped in sorted((dropouts or {}).items()):
            chk.integer("dropouts round", r, minimum=0)
            if isinstance(dropped, numbers.Integral) and not isinstance(dropped, bool):
                drops.append({"round": int(r), "dropped": chk.integer(f"dropouts[{r}]", dropped, minimum=0), "ids": None})
            elif isinstance(dropped, (list, tuple)) and all(isinstance(i, str) for i in dropped):
                drops.append({"round": int(r), "dropped": len(dropped), "ids": sorted(dropped)})
            else:
                raise DPTypeError(f"dropouts[{r!r}] must be an int or a sequence of client ids, got {dropped!r}")
        under = [
            {"round": e.round_index, "survivors": e.survivors, "min_clients": e.min_clients}
            for e in client_events
            if isinstance(e, (SkellamEvent, DiscreteGaussianEvent)) and e.survivors < e.min_clients
        ]

        rev = []
        for item in reveals:
            if isinstance(item, Mapping):
                unknown = set(item) - {"round", "round_index", "what", "why"}
                if unknown:
                    raise DPValueError(f"reveal records take round/what/why, got unknown keys {sorted(unknown)}")
                # Reveal checks each field (a missing one is refused there, naming it)
                item = Reveal(
                    round_index=cast(int, item.get("round_index", item.get("round"))),
                    what=cast(str, item.get("what")),
                    why=cast(str, item.get("why")),
                )
            if not isinstance(item, Reveal):
                raise DPTypeError(f"reveals must hold Reveal records or mappings, got {type(item).__name__}")
            rev.append({"round": item.round_index, "what": item.what, "why": item.why})

        util = []
        for r, metrics in sorted((utility or {}).items()):
            chk.integer("utility round", r, minimum=0)
            if not isinstance(metrics, Mapping):
                raise DPTypeError(f"utility[{r!r}] must be a mapping metric -> value, got {type(metrics).__name__}")
            util.append({"round": int(r), "metrics": {str(k): chk.real(f"utility[{r}][{k!r}]", v) for k, v in metrics.items()}})

        # the claim an audit is checked against: the run's headline figure at the audit's level
        if audit_rec["ran"]:
            claimed = (
                audit_rec.get("tested_epsilon") if audit_rec.get("tested_epsilon") is not None
                else sample["max_epsilon"] if sample and (audit_rec.get("level") == "sample" or not client)
                else client["epsilon"] if client else None
            )  # fmt: skip
            ceiling = audit_rec["ceiling"]
            audit_rec.update(
                claimed_epsilon=claimed,
                exceeds_claim=claimed is not None and audit_rec["lower_bound"] > claimed,
                conclusive=claimed is None or ceiling is None or claimed < ceiling,
            )
            if audit_rec["exceeds_claim"]:
                warnings.warn(
                    f"PRIVACY AUDIT FAILED: audited epsilon lower bound {audit_rec['lower_bound']:.4g} exceeds the "
                    f"claimed epsilon {claimed:.4g}; the noise or the accounting of this run is broken",
                    PrivacyAuditWarning,
                    stacklevel=2,
                )

        budget_info = None
        if budget is not None:
            by_level = budget.spent_by_level(events)
            spent = max(by_level.values())
            budget_info = {
                "epsilon": budget.epsilon, "delta": budget.delta, "accountant": budget.accountant,
                "level": budget.level, "spent": spent, "spent_by_level": by_level,
                "remaining": max(0.0, budget.epsilon - spent),
            }  # fmt: skip

        unit = unit_of_privacy or self._default_unit(client_events, sample_events)
        warn = []
        for section, name in ((client, "client-level"), (sample, "sample-level")):
            if section and section.get("cross_check_below_headline"):
                warn.append(f"the {name} cross-check ({section['cross_check_accountant']}) is below the headline "
                            f"({section['accountant_used']}): one of the accountants is wrong; do not rely on this report")  # fmt: skip
        self.data: dict[str, Any] = {
            "schema": REPORT_SCHEMA,
            "title": title,
            "generated_at": generated_at,
            "delta": d,
            "accountant": acc,
            "mode": {"name": mode, "trust_model": trust_model},
            "summary": self._summary(
                unit,
                client,
                sample,
                d,
                mode,
                _flat(client_events),
                _flat(sample_events),
                releases,
                rev,
                seed_derivable,
                audit_rec,
            ),  # fmt: skip
            "parties": party_rows or self._default_parties(mode, trust_model, _flat(client_events), _flat(sample_events), rev),
            "non_private_releases": releases,
            "seed_derivable": seed_derivable,
            "client_level": client,
            "sample_level": sample,
            "budget": budget_info,
            "mechanisms": _mechanism_rows(events),
            "secure_aggregation": {
                "parameters": _json_value("secure_aggregation", dict(secure_aggregation or {})),
                "dropouts": drops,
                "rounds_below_min_clients": under,
            },
            "reveals": rev,
            "utility": util,
            "utility_reference": reference,
            "audit": audit_rec,
            "provenance": _provenance(provenance),
            "warnings": warn,
            "tuning": self._tuning_section(tuning_events, tuning, d),
            "assumptions": self._assumptions(_flat(events), client_events, sample_events, under)
            + self._tuning_assumptions(tuning_events),
            "events": [event_to_dict(e) for e in events],
        }
        tuned = self.data["tuning"]
        if tuned:
            self.data["summary"]["covered"].append(
                "Private hyperparameter search: " + "; ".join(tuned["covered"]) + " (the search's whole cost is in the "
                "epsilon above)."
            )
            self.data["summary"]["not_covered"] += [f"private search: {x}" for x in tuned["not_covered"]]

    # ------------------------------------------------------------------------- epsilon

    @staticmethod
    def _curve_points(rounds: list[int], fast: bool) -> list[int]:
        if fast or len(rounds) <= _MAX_CURVE_POINTS_SLOW:
            return rounds
        step = (len(rounds) - 1) / (_MAX_CURVE_POINTS_SLOW - 1)
        return sorted({rounds[round(i * step)] for i in range(_MAX_CURVE_POINTS_SLOW)})

    @overload
    @staticmethod
    def _eps(events: Sequence[Event], delta: float, which: str, *, strict: Literal[True]) -> float: ...
    @overload
    @staticmethod
    def _eps(events: Sequence[Event], delta: float, which: str, *, strict: Literal[False]) -> float | None: ...
    @staticmethod
    def _eps(events: Sequence[Event], delta: float, which: str, *, strict: bool) -> float | None:
        try:
            return _epsilon_groups(_groups(events), delta, which)
        except AccountingError:
            if strict:
                raise
            return None  # the cross-check accountant does not apply to this history

    @classmethod
    def _client_section(cls, events: Sequence[Event], d: float, acc: str) -> dict[str, Any] | None:
        if not events:
            return None
        used = _used(_groups(events), acc)
        cross = "rdp" if used != "rdp" else ("pld" if _used(_groups(events), "pld") == "pld" else "prv")
        rounds = sorted({e.round_index for e in events})
        curve: list[dict[str, Any]] = []
        for r in cls._curve_points(rounds, used == "rdp"):
            upto = [e for e in events if e.round_index <= r]
            curve.append({"round": r, "epsilon": cls._eps(upto, d, used, strict=True),
                          "cross_check": cls._eps(upto, d, cross, strict=False)})  # fmt: skip
        headline = curve[-1]["epsilon"]
        by_acc = epsilon_by_accountant(events, delta=d)
        by_acc[used] = headline
        cc = curve[-1]["cross_check"]
        return {
            "epsilon": headline,
            "accountant_used": used,
            "cross_check_accountant": cross,
            "cross_check": {"accountant": cross, "epsilon": cc},
            "cross_check_below_headline": cc is not None and cc < headline * (1 - 1e-9),
            "by_accountant": by_acc,
            "rounds": len(rounds),
            "events": len(events),
            "epsilon_over_rounds": curve,
        }

    @classmethod
    def _sample_section(cls, events: Sequence[Event], d: float, acc: str) -> dict[str, Any] | None:
        if not events:
            return None
        acc = _used(_groups(events), acc)
        cross = "rdp" if acc != "rdp" else ("pld" if _used(_groups(events), "pld") == "pld" else "prv")
        per: dict[str, list[Event]] = {}
        for e in events:  # sample-level events (a search's included) name their client
            assert isinstance(e, (SampleLevelEvent, TuningEvent)) and e.client_id is not None
            per.setdefault(e.client_id, []).append(e)
        per_client: dict[str, dict[str, Any]] = {
            cid: {
                "epsilon": cls._eps(per[cid], d, acc, strict=True),
                "cross_check": cls._eps(per[cid], d, cross, strict=False),
                "rounds": len({e.round_index for e in per[cid]}),
                "steps": sum(e.steps for e in _flat(per[cid]) if isinstance(e, SampleLevelEvent)),
            }
            for cid in sorted(per)
        }
        rounds = sorted({e.round_index for e in events})
        curve: list[dict[str, Any]] = []
        for r in cls._curve_points(rounds, acc == "rdp"):
            if r == rounds[-1]:
                worst = max(v["epsilon"] for v in per_client.values())
            else:
                worst = max(cls._eps([e for e in evs if e.round_index <= r], d, acc, strict=True) for evs in per.values())
            curve.append({"round": r, "max_epsilon": worst})
        worst_id = max(per_client, key=lambda c: per_client[c]["epsilon"])
        return {
            "per_client": per_client,
            "max_epsilon": per_client[worst_id]["epsilon"],
            "max_epsilon_client": worst_id,
            "accountant_used": acc,
            "cross_check_accountant": cross,
            "cross_check_below_headline": any(
                v["cross_check"] is not None and v["cross_check"] < v["epsilon"] * (1 - 1e-9) for v in per_client.values()
            ),
            "epsilon_over_rounds": curve,
        }

    # ------------------------------------------------------------------------- tuning

    @staticmethod
    def _tuning_section(events: Sequence[TuningEvent], given: Mapping[str, Any] | None, d: float) -> dict[str, Any] | None:
        """The private search: its distribution, one trial's cost, the bound, and what is and is not covered."""
        if not events:
            return None
        data = _json_value("tuning", dict(given or {}))
        dists = sorted({e.distribution.describe() for e in events})
        per_trial = {}
        for e in events:
            who = "client level" if e.level == "client" else f"client {e.client_id!r}"
            one = _epsilon_groups(_groups(e.trial), d, "rdp")
            per_trial[who] = {
                "one_trial_epsilon": one,
                "one_trial_with_score_epsilon": _epsilon_groups(
                    _groups(e.trial) + Counter({("gaussian", e.score_noise_multiplier, 1.0): 1}), d, "rdp"
                ),
                "search_epsilon": _epsilon_groups(_groups([e]), d, "rdp"),
            }
        z = sorted({e.score_noise_multiplier for e in events})
        return {
            **data,
            "distribution": dists[0] if len(dists) == 1 else dists,
            "expected_trials": events[0].distribution.mean,
            "score_noise_multiplier": z[0] if len(z) == 1 else z,
            "epsilon_by_guarantee": per_trial,
            "headline_accountant": "rdp",
            "how_it_composes": (
                "Each trial is one whole training run at the same worst-case privacy cost (its noise calibrated so that "
                "its RDP curve stays below the planned trial's at every order) plus one Gaussian-noised selection score "
                "(sensitivity 1). The number of trials K was drawn once, before the first trial, from the distribution "
                "above, and only the best trial is released. Papernot & Steinke (ICLR 2022) Theorem 2 (truncated "
                "negative binomial) or Theorem 6 (Poisson) bound the RDP of that release from one trial's RDP curve; "
                "the bound is converted to (epsilon, delta) like every RDP figure here (Balle et al. 2020, Thm. 21) and "
                "composed with the rest of the ledger by adding RDP curves."
            ),
            "why_rdp_headline": (
                "The theorems are stated in Renyi DP; a privacy loss distribution (PLD) or PRV of the best of a random "
                "number of runs is not implemented, so the headline of a tuned run is the RDP bound (PLD and PRV are "
                "shown as not applicable)."
            ),
            "covered": [
                "the selected trial's hyperparameters, its trained model and its noised validation score",
            ],
            "not_covered": [
                "the number of trials run (the theorem holds only while it stays hidden)",
                "any other trial's hyperparameters, score, model or metrics (kept out of this report)",
                "the selected model's test metrics, computed without noise on the clients' held-out test data",
                "the number of validation examples per client (the score's denominator)",
            ],
        }

    @staticmethod
    def _tuning_assumptions(events: Sequence[TuningEvent]) -> list[str]:
        if not events:
            return []
        return [
            "Private hyperparameter search (Papernot & Steinke, ICLR 2022, Thm. 2 / Thm. 6): the trials are "
            "independent runs of one randomized procedure (hyperparameters drawn independently from the space, no "
            "trial depending on another's result), the number of trials is drawn from the stated distribution and "
            "kept hidden, and only the best trial is released. The headline of a history holding a search is RDP.",
        ]

    # ------------------------------------------------------------------------- words

    @staticmethod
    def _default_unit(client_events: Sequence[Event], sample_events: Sequence[Event]) -> str:
        if any(_event_unit(e) == "user" for e in client_events):
            return "one user of one silo (all of that user's examples)"
        if client_events:
            return "one whole client (all of its data)"
        if sample_events:
            return ("one training example of one client (it protects a person only if each person contributes one "
                    "example built from their record alone)")  # fmt: skip
        return "nothing (no differential-privacy mechanism ran)"

    @staticmethod
    def _summary(unit, client, sample, d, mode, client_events, sample_events, releases, rev, seed_derivable, audit):
        guarantees = []
        if client:
            guarantees.append({"level": "client", "epsilon": client["epsilon"], "delta": d,
                               "accountant": client["accountant_used"],
                               "in_words": _eps_words(client["epsilon"], d, unit)})  # fmt: skip
        if sample:
            guarantees.append({"level": "sample", "epsilon": sample["max_epsilon"], "delta": d,
                               "accountant": sample["accountant_used"],
                               "in_words": _eps_words(sample["max_epsilon"], d, unit if not client else "one training example of one client")
                               + f" (the largest over {len(sample['per_client'])} client(s), client {sample['max_epsilon_client']!r})"})  # fmt: skip
        against = []
        if sample_events:
            against.append("Sample level (DP-SGD on each client): each client's update is noised before it leaves the "
                           "client, so the guarantee holds against the server, the other clients and whoever receives "
                           "the model.")  # fmt: skip
        if any(isinstance(e, GaussianEvent) for e in client_events):
            against.append("Client level, central noise: holds against the other clients and whoever receives the model, "
                           "NOT against the server, which sees the un-noised sum before it adds the noise.")  # fmt: skip
        if any(isinstance(e, (SkellamEvent, DiscreteGaussianEvent)) for e in client_events):
            against.append(f"Client level, distributed noise in a {mode} sum: each client noises its own update before "
                           "it is protected, so it holds against the server too, as long as at least the number of "
                           "clients the noise was sized for survive each round and the server colludes with none of "
                           "them (each client knows its own share of the noise).")  # fmt: skip
        if any(_event_unit(e) == "user" for e in client_events):
            against.append("User level across silos: each silo clips every one of its users' gradients to the bound and "
                           "sends their sum, and the noise is added once to the sum over all silos; the guarantee is the "
                           "client-level one above with a user, not a silo, as the unit. Each silo holds its users' data "
                           "and is trusted by them to clip; it does not hold against the user's own silo.")  # fmt: skip
        if not against:
            against.append("No one: no differential-privacy mechanism ran; only the protection mode applies.")
        not_covered = [f"{x['what']}" + (f" ({x['note']})" if x["note"] else "") for x in releases]
        not_covered += [f"round {r['round']}: {r['what']} ({r['why']})" for r in rev]
        if seed_derivable:
            not_covered.append("Reproducible simulation: the noise is derivable from the seed; the guarantee holds only "
                               "against whoever does not know it.")  # fmt: skip
        if any(e.sampling == "fixed_size" for e in list(client_events) + list(sample_events)):
            not_covered.append("Fixed-size sampling was accounted as if it were Poisson sampling at the same rate (an "
                               "approximation, not a proof).")  # fmt: skip
        covered = ["Everything derived from the noised outputs recorded in the ledger: the trained model and what is "
                   "computed from it without touching the private data again."] if guarantees else []  # fmt: skip
        if audit["ran"]:
            ceiling = "" if audit["ceiling"] is None else f" (the most it could certify: {audit['ceiling']:.3g})"
            verdict = ("there is no differential-privacy claim to compare it with" if audit["claimed_epsilon"] is None
                       else "it EXCEEDS the claim: the run is broken" if audit["exceeds_claim"]
                       else "it could not have refuted the claim, which is above its ceiling" if not audit["conclusive"]
                       else "consistent with the claim")  # fmt: skip
            tested = (
                f" It tested the accountant's privacy curve at delta = {audit['delta']:.3g}, where the claim is "
                f"epsilon = {audit['tested_epsilon']:.3g} (the same curve as the headline, at the delta where one "
                "audited run can refute it)."
                if audit.get("tested_epsilon") is not None and audit.get("delta") is not None else ""
            )  # fmt: skip
            audit_line = (
                f"A privacy audit ran: empirical lower bound {audit['lower_bound']:.3g}{ceiling}; {verdict}.{tested}"
                f" Method: {audit['method'] or 'canary audit'}; {audit['canaries'] or 'an unknown number of'} canaries."
            )
        else:
            audit_line = "No privacy audit ran for this run."
        return {
            "unit_of_privacy": unit,
            "protected_against": against,
            "guarantees": guarantees,
            "covered": covered,
            "not_covered": not_covered,
            "audit": audit_line,
        }

    @staticmethod
    def _default_parties(mode, trust_model, client_events, sample_events, rev) -> list[dict[str, str]]:
        central = any(isinstance(e, GaussianEvent) for e in client_events)
        server = trust_model + (" With central noise it also sees the sum before the noise is added." if central else "")
        rows = [
            {"party": "server", "sees": server},
            {"party": "other clients", "sees": "the global model each round (the noised aggregate), never another "
                                               "client's update"},
            {"party": "key holder", "sees": "the decrypted aggregate, flooded with noise before it leaves" if mode == "ckks"
                                            else f"there is no key holder in mode {mode!r}"},
            {"party": "whoever receives the model",
             "sees": "the final model, covered by the guarantee above" if (client_events or sample_events)
             else "the final model, with no differential-privacy guarantee"},
        ]  # fmt: skip
        if rev:
            rows[-1]["sees"] += f"; and {len(rev)} individually revealed model(s), listed under model reveals"
        return rows

    @staticmethod
    def _assumptions(
        events: Sequence[Event], client_events: Sequence[Event], sample_events: Sequence[Event], under: list
    ) -> list[str]:
        out = [
            "Adjacency is add/remove one client (client level) or one record of one client (sample level); "
            "the client-level guarantee and each client's sample-level guarantee are separate (epsilon, delta) statements.",
            *(
                [
                    "Client level with unit 'user': adjacency is add/remove one user; each user's data sits in one silo "
                    "(checked when the run is built), every silo is asked every round (no sampling of silos; a silo "
                    "that drops out takes its users out of that round's sum), each silo draws its users' randomness "
                    "once a round, the model draws no randomness of its own (no dropout; refused), the rounds are "
                    "synchronous (asynchronous buffers are refused), and one user moves its silo's rounded, clipped "
                    "sum by at most the recorded sensitivity (the silo's clip is a projection, so 1-Lipschitz)."
                ]
                if any(_event_unit(e) == "user" for e in client_events)
                else []
            ),
            "Headline figures: the PLD accountant of dp_accounting with pessimistic rounding (an upper bound) for "
            "Gaussian mechanisms; Skellam and discrete Gaussian noise through their RDP bounds; RDP is the cross-check.",
            "Each round is released once or charged again: a synchronous round that fails, is interrupted or "
            "crashes after its first update may have left a client is charged at its planned worst case and its "
            "number is not used again (the server writes the planned events before the first update leaves, and a "
            "resumed run records them), as is an asynchronous update; a masked or encrypted round that fails for "
            "too few survivors shows the server nothing and is not charged. The ledger is the server's: a server that "
            "restores an earlier checkpoint on purpose, or discards its ledger, can have rounds run again with fresh "
            "noise that this report does not count. Against that, under a sample-level budget each client party keeps "
            "its own ledger of the updates it released and refuses, before training, a round that would take it over "
            "the budget, so no client releases more DP-SGD updates than the budget allows whatever the server asks; "
            "the metrics it reports are the non-private releases listed, and client-level noise has no such "
            "client-side limit.",
        ]
        if any(e.sampling == "poisson" and e.sample_rate < 1 for e in events):
            out.append(
                "Sampling recorded as 'poisson' is independent per client (or record) with the recorded rate, "
                "as the accountants assume."
            )
        if any(e.sampling == "fixed_size" for e in events):
            out.append(
                "Sampling recorded as 'fixed_size' (a fixed number drawn without replacement, or shuffled batches) "
                "is accounted as Poisson sampling with the same rate: the usual approximation, not a proven bound."
            )
        if any(isinstance(e, QuantileEvent) for e in events):
            out.append(
                "Adaptive clipping (Andrew et al. 2021): the server adds the count noise centrally and sees the raw "
                "count; the count and the round's update noise are accounted as one mechanism on the same "
                "clients (effective noise multiplier, Sec. 3.1)."
            )
        if any(isinstance(e, GaussianEvent) for e in events):
            out.append("Central Gaussian noise: the server is trusted with the un-noised sum.")
        if any(isinstance(e, (SkellamEvent, DiscreteGaussianEvent)) for e in events):
            out.append(
                "Distributed integer noise: each client noises its own encoded vector before masking; the accountant "
                "uses the noise present in the sum of the survivors and the L2 sensitivity inflated by rounding "
                "(Kairouz, Liu, Steinke 2021). Client-level sampling amplification for Skellam and discrete Gaussian "
                "uses the general Poisson-subsampling RDP bound of Zhu & Wang 2019."
            )
        if under:
            out.append(
                f"WARNING: {len(under)} round(s) had fewer survivors than the noise was sized for; the accountant "
                "used the smaller noise actually present."
            )
        if sample_events:
            out.append(
                "Sample-level DP-SGD runs through Opacus; per-client epsilons compose each client's runs over the "
                "rounds it took part in (no amplification from client sampling is claimed)."
            )
        return out

    def to_json(self, *, indent: int | None = 2) -> str:
        """Machine-readable report (strict JSON: non-finite numbers become strings)."""
        return json.dumps(_finite(self.data), indent=indent, sort_keys=False, allow_nan=False)

    # ------------------------------------------------------------------------- plots

    def _plots(self) -> dict[str, str | None]:
        d = self.data
        out: dict[str, str | None] = {"epsilon": None, "sample": None, "utility": None}
        client, sample, budget = d["client_level"], d["sample_level"], d["budget"]
        if client or sample:

            def draw_eps(ax: Any) -> None:
                if client:
                    pts = client["epsilon_over_rounds"]
                    xs = [p["round"] for p in pts]
                    ax.plot(xs, [p["epsilon"] for p in pts], marker="o", ms=3,
                            label=f"client level ({client['accountant_used']})")  # fmt: skip
                    if all(p["cross_check"] is not None for p in pts):
                        ax.plot(xs, [p["cross_check"] for p in pts], ls="--", color="#888888",
                                label=f"client level, cross-check ({client['cross_check_accountant']})")  # fmt: skip
                if sample:
                    pts = sample["epsilon_over_rounds"]
                    ax.plot([p["round"] for p in pts], [p["max_epsilon"] for p in pts], marker="s", ms=3, color="#4e9a06",
                            label=f"sample level, largest client ({sample['accountant_used']})")  # fmt: skip
                if budget:
                    ax.axhline(budget["epsilon"], color="#a40000", ls=":", label=f"budget ({budget['epsilon']:g})")
                ax.set_xlabel("round")
                ax.set_ylabel(f"epsilon spent (delta = {d['delta']:.1g})")
                ax.set_ylim(bottom=0)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=9)

            out["epsilon"] = _png(draw_eps)
        if sample:
            per = sample["per_client"]
            ids = list(per)
            vals = [per[c]["epsilon"] for c in ids]
            limit = budget["epsilon"] if budget and budget["level"] in ("all", "sample") else None

            def draw_sample(ax: Any) -> None:
                if len(ids) <= 40:
                    ax.barh(range(len(ids)), vals, color="#3465a4")
                    ax.set_yticks(range(len(ids)))
                    ax.set_yticklabels(ids, fontsize=9)
                    ax.invert_yaxis()
                    ax.set_ylabel("client")
                    ax.set_xlabel(f"sample-level epsilon (delta = {d['delta']:.1g})")
                    if limit is not None:
                        ax.axvline(limit, color="#a40000", ls=":", label=f"budget ({limit:g})")
                        ax.legend(fontsize=9, loc="lower right")
                    ax.grid(alpha=0.3, axis="x")
                else:
                    ax.hist(vals, bins=30, color="#3465a4")
                    ax.set_xlabel(f"sample-level epsilon (delta = {d['delta']:.1g})")
                    ax.set_ylabel("clients")
                    if limit is not None:
                        ax.axvline(limit, color="#a40000", ls=":", label=f"budget ({limit:g})")
                        ax.legend(fontsize=9)
                    ax.grid(alpha=0.3, axis="y")

            height = max(2.6, 0.28 * len(ids) + 1.2) if len(ids) <= 40 else 3.2
            out["sample"] = _png(draw_sample, height=height)
        util, ref = d["utility"], d["utility_reference"]
        if util:

            def draw_util(ax: Any) -> None:
                names = sorted({k for u in util for k in u["metrics"]})
                for i, n in enumerate(names):
                    color = f"C{i % 10}"
                    xs = [u["round"] for u in util if n in u["metrics"]]
                    ys = [u["metrics"][n] for u in util if n in u["metrics"]]
                    ax.plot(xs, ys, marker="o", ms=3, color=color, label=f"{n} (with DP)")
                    if n in ref:
                        ax.axhline(ref[n], color=color, ls="--", label=f"{n} without DP (reference)")
                ax.set_xlabel("round")
                ax.set_ylabel("metric value")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=9)

            out["utility"] = _png(draw_util)
        return out

    # ------------------------------------------------------------------------- HTML

    def _fragment(self) -> str:
        d = self.data
        e = html.escape
        s = d["summary"]
        parts = [f'<div class="privfl-dp-report"><style>{_CSS}</style>', f"<h1>{e(d['title'])}</h1>"]
        parts.append(f"<p>Generated {e(d['generated_at'])} · schema {e(d['schema'])}</p>")
        for w in d["warnings"]:
            parts.append(f'<p class="warn"><b>WARNING: {e(w)}</b></p>')
        audit = d["audit"]
        if audit["ran"] and audit["exceeds_claim"]:
            parts.append(
                f'<p class="warn"><b>PRIVACY AUDIT FAILED: the audited lower bound on epsilon, {e(_fmt(audit["lower_bound"]))}, '
                f"exceeds the claimed epsilon {e(_fmt(audit['claimed_epsilon']))}. The noise or the accounting of this run "
                "is broken; do not rely on the figures below.</b></p>"
            )
        parts.append('<h2>Summary</h2><div class="headline">')
        parts.append(f"<p><b>Who is protected:</b> {e(s['unit_of_privacy'])}.</p>")
        parts.append("<p><b>Against whom:</b></p><ul>" + "".join(f"<li>{e(x)}</li>" for x in s["protected_against"]) + "</ul>")
        if s["guarantees"]:
            parts.append("<p><b>The guarantee:</b></p><ul>" + "".join(
                f"<li>{e(g['level'].capitalize())} level ({e(g['accountant'])} accountant): {e(g['in_words'])}</li>"
                for g in s["guarantees"]) + "</ul>")  # fmt: skip
        else:
            parts.append("<p>No differential-privacy mechanism was recorded in the ledger.</p>")
        if s["covered"]:
            parts.append("<p><b>Covered:</b> " + e(" ".join(s["covered"])) + "</p>")
        parts.append("<p><b>Not covered (released or assumed outside the guarantee):</b></p>")
        parts.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in s["not_covered"]) + "</ul>" if s["not_covered"]
                     else "<p>Nothing was reported as released outside the guarantee.</p>")  # fmt: skip
        parts.append(f"<p><b>Audit:</b> {e(s['audit'])}</p>")
        if d["budget"]:
            b = d["budget"]
            parts.append(
                f"<p><b>Budget</b> ({e(b['level'])} levels): epsilon {e(_fmt(b['epsilon']))} at delta {e(_fmt(b['delta']))}; "
                f"spent {e(_fmt(b['spent']))}, remaining {e(_fmt(b['remaining']))} ({e(b['accountant'])}).</p>"
            )
        parts.append("</div>")

        parts.append("<h2>What each party sees</h2>")
        parts.append(_table(["party", "sees"], [[p["party"], p["sees"]] for p in d["parties"]]))

        parts.append("<h2>Detail</h2>")
        parts.append("<h3>Mode and trust model</h3>")
        parts.append(f'<p>Mode: <b>{e(d["mode"]["name"])}</b></p><div class="trust">{e(d["mode"]["trust_model"])}</div>')
        plots = self._plots()
        client, sample = d["client_level"], d["sample_level"]
        parts.append("<h3>Epsilon over rounds</h3>")
        parts.append(
            f'<img alt="epsilon over rounds" src="data:image/png;base64,{plots["epsilon"]}">'
            if plots["epsilon"]
            else "<p>No differential-privacy events.</p>"
        )
        if client:
            parts.append(_table(
                ["accountant", "client-level epsilon"],
                [[a + (" (headline)" if a == client["accountant_used"] else ""),
                  v if v is not None else "n/a (does not cover this history)"] for a, v in client["by_accountant"].items()],
            ))  # fmt: skip
        parts.append("<h3>Per-client sample-level epsilon</h3>")
        if plots["sample"]:
            parts.append(f'<img alt="per-client sample-level epsilon" src="data:image/png;base64,{plots["sample"]}">')
            parts.append(
                _table(
                    [
                        "client",
                        f"epsilon ({sample['accountant_used']})",
                        f"cross-check ({sample['cross_check_accountant']})",
                        "rounds",
                        "steps",
                    ],
                    [[c, v["epsilon"], v["cross_check"], v["rounds"], v["steps"]] for c, v in sample["per_client"].items()],
                )
            )
        else:
            parts.append("<p>No sample-level events.</p>")
        parts.append("<h3>Utility over rounds</h3>")
        parts.append(
            f'<img alt="utility over rounds" src="data:image/png;base64,{plots["utility"]}">'
            if plots["utility"]
            else "<p>No utility history given.</p>"
        )
        if d["utility"] and not d["utility_reference"]:
            parts.append("<p>No non-DP reference was given to compare with.</p>")

        tuned = d["tuning"]
        if tuned:
            parts.append("<h3>Private hyperparameter search</h3>")
            rows = [[k, tuned[k]] for k in ("distribution", "expected_trials", "trials_run", "score_noise_multiplier",
                                             "headline_accountant") if k in tuned]  # fmt: skip
            for k in ("space", "score", "winner"):
                if k in tuned:
                    rows.append([k, json.dumps(tuned[k], sort_keys=True)])
            parts.append(_table(["setting", "value"], rows))
            parts.append(_table(
                ["guarantee", "one trial", "one trial with its score", "the whole search (best trial released)"],
                [[who, v["one_trial_epsilon"], v["one_trial_with_score_epsilon"], v["search_epsilon"]]
                 for who, v in tuned["epsilon_by_guarantee"].items()],
            ))  # fmt: skip
            parts.append(f"<p>{e(tuned['how_it_composes'])}</p><p>{e(tuned['why_rdp_headline'])}</p>")
            parts.append("<p><b>Covered:</b> " + e("; ".join(tuned["covered"])) + ".</p>")
            parts.append("<p><b>Not covered:</b></p><ul>" + "".join(f"<li>{e(x)}</li>" for x in tuned["not_covered"]) + "</ul>")
        parts.append("<h3>Mechanisms and parameters</h3>")
        if d["mechanisms"]:
            parts.append(
                _table(
                    [
                        "mechanism",
                        "level",
                        "unit of privacy",
                        "parameters",
                        "uses",
                        "rounds",
                        "participants",
                        "survivors",
                        "details",
                    ],
                    [
                        [
                            m["mechanism"],
                            m["level"],
                            m["unit"],
                            m["parameters"],
                            m["uses"],
                            m["rounds"],
                            m.get("participants", "—"),
                            m.get("survivors", "—"),
                            {
                                k: v
                                for k, v in m.items()
                                if k
                                in ("clients", "steps", "sample_rate", "noise_multiplier_present", "l2_sensitivity", "clip_bound")
                            }
                            or "—",
                        ]
                        for m in d["mechanisms"]
                    ],
                )
            )
        else:
            parts.append("<p>None recorded.</p>")

        sa = d["secure_aggregation"]
        parts.append("<h3>Secure aggregation</h3>")
        parts.append(
            _table(["setting", "value"], _fields(sa["parameters"])) if sa["parameters"] else "<p>No parameters given.</p>"
        )
        parts.append("<h4>Observed dropouts</h4>")
        parts.append(
            _table(
                ["round", "dropped", "clients"],
                [[x["round"], x["dropped"], ", ".join(x["ids"]) if x["ids"] else "—"] for x in sa["dropouts"]],
            )
            if sa["dropouts"]
            else "<p>None reported.</p>"
        )
        if sa["rounds_below_min_clients"]:
            parts.append('<p class="warn">Rounds with fewer survivors than the distributed noise was sized for:</p>')
            parts.append(
                _table(
                    ["round", "survivors", "min_clients"],
                    [[x["round"], x["survivors"], x["min_clients"]] for x in sa["rounds_below_min_clients"]],
                )
            )

        parts.append("<h3>Model reveals</h3>")
        parts.append(
            _table(["round", "revealed", "why allowed"], [[r["round"], r["what"], r["why"]] for r in d["reveals"]])
            if d["reveals"]
            else "<p>No individual model was revealed.</p>"
        )
        parts.append("<h3>Privacy audit</h3>")
        if audit["ran"]:
            parts.append(
                _table(["field", "value"], [[_humanize(k), "—" if v is None else v] for k, v in audit.items() if k != "ran"])
            )
        else:
            parts.append("<p>No privacy audit ran for this run.</p>")
        parts.append("<h3>Provenance</h3>")
        parts.append(_table(["field", "value"], [[_humanize(k), v] for k, v in d["provenance"].items()]))
        parts.append("<h3>Assumptions</h3><ul>" + "".join(f"<li>{e(a)}</li>" for a in d["assumptions"]) + "</ul>")
        parts.append("</div>")
        return "".join(parts)

    def to_html(self) -> str:
        """One self-contained HTML page (inline CSS and base64 PNG plots, no external resources)."""
        return (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.data['title'])}</title></head><body>{self._fragment()}</body></html>"
        )

    def _repr_html_(self) -> str:
        return self._fragment()

    def save(self, folder: str | pathlib.Path) -> ReportPaths:
        """Write ``privacy_report.json`` and ``privacy_report.html`` into ``folder`` (created)."""
        path = pathlib.Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        paths = ReportPaths(json=path / "privacy_report.json", html=path / "privacy_report.html")
        paths.json.write_text(self.to_json(), encoding="utf-8")
        paths.html.write_text(self.to_html(), encoding="utf-8")
        return paths

    def __repr__(self) -> str:
        c, s = self.data["client_level"], self.data["sample_level"]
        return (
            f"PrivacyReport(mode={self.data['mode']['name']!r}, client_epsilon="
            f"{c['epsilon'] if c else None!r}, max_sample_epsilon={s['max_epsilon'] if s else None!r}, "
            f"delta={self.data['delta']!r})"
        )
