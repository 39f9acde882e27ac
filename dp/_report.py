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
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from . import _checks as chk
from ._accounting import ACCOUNTANTS, _epsilon_groups, _events_of, _groups
from ._budget import PrivacyBudget
from ._errors import AccountingError, DPTypeError, DPValueError, PrivacyAuditWarning
from ._events import (
    DiscreteGaussianEvent,
    Event,
    GaussianEvent,
    QuantileEvent,
    SampleLevelEvent,
    SkellamEvent,
    event_to_dict,
)
from ._ledger import Ledger

__all__ = ["PrivacyReport", "Reveal", "ReportPaths", "REPORT_SCHEMA"]

#: Schema name and version of ``PrivacyReport.to_json`` (bump on incompatible change).
REPORT_SCHEMA = "privfl.dp.report/1"

_MAX_CURVE_POINTS_SLOW = 12  # PRV-based curves are evaluated at most at this many rounds


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


def _mechanism_rows(events: Sequence[Event]) -> list[dict[str, Any]]:
    rows: dict[tuple, dict[str, Any]] = {}
    for e in events:
        names = _PARAMS[type(e)]
        key = (e.mechanism, e.level) + tuple(getattr(e, n) for n in names)
        row = rows.get(key)
        if row is None:
            row = rows[key] = {
                "mechanism": e.mechanism,
                "level": e.level,
                "parameters": {n: getattr(e, n) for n in names},
                "uses": 0,
                "rounds": [e.round_index, e.round_index],
            }
        row["uses"] += 1
        row["rounds"] = [min(row["rounds"][0], e.round_index), max(row["rounds"][1], e.round_index)]
        if isinstance(e, SampleLevelEvent):
            row.setdefault("clients", set()).add(e.client_id)
            row["steps"] = row.get("steps", 0) + e.steps
            row["sample_rate"] = [min(row.get("sample_rate", [1.0])[0], e.sample_rate), max(row.get("sample_rate", [0.0])[-1], e.sample_rate)]
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
            row["clip_bound"] = [e.clip_bound, e.clip_bound] if cur is None else [min(cur[0], e.clip_bound), max(cur[1], e.clip_bound)]
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
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
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


# ----------------------------------------------------------------------------- report


class PrivacyReport:
    """The privacy budget report of a training run, computed once from the ledger.

    Args:
        ledger: the run's ledger (or its events).
        delta: the delta every epsilon is stated at.
        accountant: accountant of the headline figures (``"tightest"`` by default: the
            smallest valid bound, RDP or PRV); the other one is shown as a cross-check.
        mode: name of the protection mode (``"plaintext"``, ``"masked"``, ``"ckks"``...).
        trust_model: the mode's trust-model text, as given by the secure-sum backend.
        secure_aggregation: the backend's parameters (thresholds etc.), JSON data.
        dropouts: observed dropouts per round: ``{round: ids}`` or ``{round: count}``.
        reveals: individual model reveals (``Reveal`` or mappings with round/what/why).
        utility: ``{round: {metric: value}}``.
        audited_epsilon_lower_bound: an empirical lower bound from a privacy audit (``dp.audit``), if
            any; one above the claimed epsilon issues a ``PrivacyAuditWarning`` and a red banner.
        budget: the run's ``PrivacyBudget``, shown with spend and remainder.
        title: page title.
        generated_at: ISO timestamp to print (default: now, UTC).

    Raises:
        DPValueError / DPTypeError: a bad argument; AccountingError if ``accountant="prv"``
            meets a non-Gaussian event.
    """

    def __init__(
        self,
        ledger: Ledger | Iterable[Event],
        *,
        delta: float,
        accountant: str = "tightest",
        mode: str,
        trust_model: str,
        secure_aggregation: Mapping[str, Any] | None = None,
        dropouts: Mapping[int, Sequence[str] | int] | None = None,
        reveals: Iterable[Reveal | Mapping[str, Any]] = (),
        utility: Mapping[int, Mapping[str, float]] | None = None,
        audited_epsilon_lower_bound: float | None = None,
        budget: PrivacyBudget | None = None,
        title: str = "Privacy budget report",
        generated_at: str | None = None,
    ) -> None:
        events = _events_of(ledger)
        d = chk.open_unit("delta", delta)
        acc = chk.one_of("accountant", accountant, ACCOUNTANTS)
        for name, v in (("mode", mode), ("trust_model", trust_model), ("title", title)):
            if not isinstance(v, str) or not v.strip():
                raise DPValueError(f"{name} must be a non-empty str, got {v!r}")
        if budget is not None and not isinstance(budget, PrivacyBudget):
            raise DPTypeError(f"budget must be a PrivacyBudget or None, got {type(budget).__name__}")
        audited = None if audited_epsilon_lower_bound is None else chk.non_negative(
            "audited_epsilon_lower_bound", audited_epsilon_lower_bound
        )
        if generated_at is None:
            generated_at = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
        cross = "rdp" if acc != "rdp" else "prv"

        def eps(evs: Sequence[Event], which: str) -> float | None:
            try:
                return _epsilon_groups(_groups(evs), d, which)
            except AccountingError:
                if which == acc:
                    raise
                return None  # the cross-check accountant does not apply to this history

        client_events = [e for e in events if e.level == "client"]
        sample_events = [e for e in events if e.level == "sample"]

        client: dict[str, Any] | None = None
        if client_events:
            rounds = sorted({e.round_index for e in client_events})
            points = rounds
            if acc != "rdp" and len(rounds) > _MAX_CURVE_POINTS_SLOW:
                step = (len(rounds) - 1) / (_MAX_CURVE_POINTS_SLOW - 1)
                points = sorted({rounds[round(i * step)] for i in range(_MAX_CURVE_POINTS_SLOW)})
            curve = []
            for r in points:
                upto = [e for e in client_events if e.round_index <= r]
                curve.append({"round": r, "epsilon": eps(upto, acc), "cross_check": eps(upto, cross)})
            by_acc = {a: (eps(client_events, a) if a != acc else curve[-1]["epsilon"]) for a in ACCOUNTANTS}
            client = {
                "epsilon": by_acc[acc],
                "cross_check": {"accountant": cross, "epsilon": by_acc[cross]},
                "by_accountant": by_acc,
                "rounds": len(rounds),
                "events": len(client_events),
                "epsilon_over_rounds": curve,
            }

        sample: dict[str, Any] | None = None
        if sample_events:
            per: dict[str, list[SampleLevelEvent]] = {}
            for e in sample_events:
                per.setdefault(e.client_id, []).append(e)  # type: ignore[arg-type]
            per_client = {
                cid: {
                    "epsilon": eps(per[cid], acc),
                    "cross_check": eps(per[cid], cross),
                    "rounds": len({e.round_index for e in per[cid]}),
                    "steps": sum(e.steps for e in per[cid]),
                }
                for cid in sorted(per)
            }
            sample = {
                "per_client": per_client,
                "max_epsilon": max(v["epsilon"] for v in per_client.values()),
                "cross_check_accountant": cross,
            }

        drops = []
        for r, v in sorted((dropouts or {}).items()):
            chk.integer("dropouts round", r, minimum=0)
            if isinstance(v, numbers.Integral) and not isinstance(v, bool):
                drops.append({"round": int(r), "dropped": chk.integer(f"dropouts[{r}]", v, minimum=0), "ids": None})
            elif isinstance(v, (list, tuple)) and all(isinstance(i, str) for i in v):
                drops.append({"round": int(r), "dropped": len(v), "ids": sorted(v)})
            else:
                raise DPTypeError(f"dropouts[{r!r}] must be an int or a sequence of client ids, got {v!r}")
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
                item = Reveal(round_index=item.get("round_index", item.get("round")), what=item.get("what"), why=item.get("why"))
            if not isinstance(item, Reveal):
                raise DPTypeError(f"reveals must hold Reveal records or mappings, got {type(item).__name__}")
            rev.append({"round": item.round_index, "what": item.what, "why": item.why})

        util = []
        for r, metrics in sorted((utility or {}).items()):
            chk.integer("utility round", r, minimum=0)
            if not isinstance(metrics, Mapping):
                raise DPTypeError(f"utility[{r!r}] must be a mapping metric -> value, got {type(metrics).__name__}")
            util.append({"round": int(r), "metrics": {str(k): chk.real(f"utility[{r}][{k!r}]", v) for k, v in metrics.items()}})

        audit = None
        if audited is not None:
            # without a DP event nothing is claimed (epsilon is unbounded), so nothing can be exceeded
            claimed = client["epsilon"] if client else sample["max_epsilon"] if sample else None
            audit = {"lower_bound": audited, "claimed_epsilon": claimed, "exceeds_claim": claimed is not None and audited > claimed}
            if audit["exceeds_claim"]:
                warnings.warn(
                    f"PRIVACY AUDIT FAILED: audited epsilon lower bound {audited:.4g} exceeds the claimed epsilon "
                    f"{claimed:.4g}; the noise or the accounting of this run is broken",
                    PrivacyAuditWarning,
                    stacklevel=2,
                )

        budget_info = None
        if budget is not None:
            spent = budget.spent(events)
            budget_info = {
                "epsilon": budget.epsilon,
                "delta": budget.delta,
                "accountant": budget.accountant,
                "level": budget.level,
                "spent": spent,
                "remaining": max(0.0, budget.epsilon - spent),
            }

        self.data: dict[str, Any] = {
            "schema": REPORT_SCHEMA,
            "title": title,
            "generated_at": generated_at,
            "delta": d,
            "accountant": acc,
            "cross_check_accountant": cross,
            "mode": {"name": mode, "trust_model": trust_model},
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
            "audit": audit,
            "assumptions": self._assumptions(events, client_events, sample_events, under),
            "events": [event_to_dict(e) for e in events],
        }

    # ------------------------------------------------------------------------- content

    @staticmethod
    def _assumptions(
        events: Sequence[Event], client_events: Sequence[Event], sample_events: Sequence[Event], under: list
    ) -> list[str]:
        out = [
            "Adjacency is add/remove one client (client level) or one record of one client (sample level); "
            "the client-level guarantee and each client's sample-level guarantee are separate (epsilon, delta) statements.",
        ]
        if any(e.sampling == "poisson" and e.sample_rate < 1 for e in events):
            out.append("Sampling recorded as 'poisson' is independent per client (or record) with the recorded rate, "
                       "as the accountants assume.")
        if any(e.sampling == "fixed_size" for e in events):
            out.append("Sampling recorded as 'fixed_size' (a fixed number drawn without replacement, or shuffled batches) "
                       "is accounted as Poisson sampling with the same rate: the usual approximation, not a proven bound.")
        if any(isinstance(e, QuantileEvent) for e in events):
            out.append("Adaptive clipping (Andrew et al. 2021): the server adds the count noise centrally and sees the raw "
                       "count; the count is accounted as its own Gaussian mechanism, composed with the update's.")
        if any(isinstance(e, GaussianEvent) for e in events):
            out.append("Central Gaussian noise: the server is trusted with the un-noised sum.")
        if any(isinstance(e, (SkellamEvent, DiscreteGaussianEvent)) for e in events):
            out.append("Distributed integer noise: each client noises its own encoded vector before masking; the accountant "
                       "uses the noise present in the sum of the survivors and the L2 sensitivity inflated by rounding "
                       "(Kairouz, Liu, Steinke 2021). Client-level sampling amplification for Skellam and discrete Gaussian "
                       "uses the general Poisson-subsampling RDP bound of Zhu & Wang 2019.")
        if under:
            out.append(f"WARNING: {len(under)} round(s) had fewer survivors than the noise was sized for; the accountant "
                       "used the smaller noise actually present.")
        if sample_events:
            out.append("Sample-level DP-SGD runs through Opacus; per-client epsilons compose each client's runs over the "
                       "rounds it took part in (no amplification from client sampling is claimed).")
        return out

    def to_json(self, *, indent: int | None = 2) -> str:
        """Machine-readable report (strict JSON: non-finite numbers become strings)."""
        return json.dumps(_finite(self.data), indent=indent, sort_keys=False, allow_nan=False)

    def _plots(self) -> dict[str, str | None]:
        d = self.data
        out: dict[str, str | None] = {"epsilon": None, "sample": None, "utility": None}
        client = d["client_level"]
        if client and client["epsilon_over_rounds"]:
            pts = client["epsilon_over_rounds"]
            budget = d["budget"]

            def draw_eps(ax: Any) -> None:
                xs = [p["round"] for p in pts]
                ys = [p["epsilon"] for p in pts]
                ax.plot(xs, ys, marker="o", ms=3, label=f"epsilon ({d['accountant']})")
                cc = [p["cross_check"] for p in pts]
                if all(v is not None for v in cc):
                    ax.plot(xs, cc, ls="--", label=f"cross-check ({d['cross_check_accountant']})")
                if budget and budget["level"] == "client":
                    ax.axhline(budget["epsilon"], color="#a40000", ls=":", label="budget")
                ax.set_xlabel("round")
                ax.set_ylabel(f"client-level epsilon (delta={d['delta']:.1g})")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)

            out["epsilon"] = _png(draw_eps)
        sample = d["sample_level"]
        if sample:
            per = sample["per_client"]

            def draw_sample(ax: Any) -> None:
                ids = list(per)
                vals = [per[c]["epsilon"] for c in ids]
                if len(ids) <= 40:
                    ax.bar(range(len(ids)), vals, color="#3465a4")
                    ax.set_xticks(range(len(ids)))
                    ax.set_xticklabels(ids, rotation=60, fontsize=7, ha="right")
                    ax.set_xlabel("client")
                else:
                    ax.hist(vals, bins=30, color="#3465a4")
                    ax.set_xlabel("sample-level epsilon")
                    ax.set_ylabel("clients")
                if len(ids) <= 40:
                    ax.set_ylabel(f"sample-level epsilon (delta={d['delta']:.1g})")
                ax.grid(alpha=0.3, axis="y")

            out["sample"] = _png(draw_sample)
        util = d["utility"]
        if util:

            def draw_util(ax: Any) -> None:
                names = sorted({k for u in util for k in u["metrics"]})
                for n in names:
                    xs = [u["round"] for u in util if n in u["metrics"]]
                    ys = [u["metrics"][n] for u in util if n in u["metrics"]]
                    ax.plot(xs, ys, marker="o", ms=3, label=n)
                ax.set_xlabel("round")
                ax.set_ylabel("metric")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)

            out["utility"] = _png(draw_util)
        return out

    def _fragment(self) -> str:
        d = self.data
        e = html.escape
        parts = [f'<div class="privfl-dp-report"><style>{_CSS}</style>', f"<h1>{e(d['title'])}</h1>"]
        parts.append(f"<p>Generated {e(d['generated_at'])} · schema {e(d['schema'])}</p>")
        client, sample = d["client_level"], d["sample_level"]
        lines = []
        if client:
            lines.append(
                f"Client-level: <b>epsilon = {e(_fmt(client['epsilon']))}</b> at delta = {e(_fmt(d['delta']))} "
                f"({e(d['accountant'])} accountant; cross-check {e(d['cross_check_accountant'])}: "
                f"{e(_fmt(client['cross_check']['epsilon']))}) over {client['rounds']} round(s)."
            )
        if sample:
            lines.append(
                f"Sample-level: largest per-client <b>epsilon = {e(_fmt(sample['max_epsilon']))}</b> at delta = "
                f"{e(_fmt(d['delta']))} over {len(sample['per_client'])} client(s)."
            )
        if not lines:
            lines.append("No differential-privacy mechanism was recorded in the ledger.")
        audit = d["audit"]
        if audit is not None and audit["exceeds_claim"]:
            lines.append(
                f'<span class="warn"><b>PRIVACY AUDIT FAILED: the audited lower bound on epsilon, '
                f"{e(_fmt(audit['lower_bound']))}, exceeds the claimed epsilon {e(_fmt(audit['claimed_epsilon']))}. "
                "The noise or the accounting of this run is broken; do not rely on the figures above.</b></span>"
            )
        elif audit is not None and audit["claimed_epsilon"] is not None:
            lines.append(
                f"Audited lower bound on epsilon: {e(_fmt(audit['lower_bound']))} "
                f"(consistent with the claimed {e(_fmt(audit['claimed_epsilon']))})."
            )
        elif audit is not None:
            lines.append(f"Audited lower bound on epsilon: {e(_fmt(audit['lower_bound']))} (no DP claim to compare with).")
        if d["budget"]:
            b = d["budget"]
            lines.append(
                f"Budget ({e(b['level'])} level): epsilon {e(_fmt(b['epsilon']))} at delta {e(_fmt(b['delta']))}; "
                f"spent {e(_fmt(b['spent']))}, remaining {e(_fmt(b['remaining']))} ({e(b['accountant'])})."
            )
        parts.append('<div class="headline">' + "<br>".join(lines) + "</div>")

        parts.append("<h2>Mode and trust model</h2>")
        parts.append(f"<p>Mode: <b>{e(d['mode']['name'])}</b></p><div class=\"trust\">{e(d['mode']['trust_model'])}</div>")

        plots = self._plots()
        parts.append("<h2>Epsilon over rounds</h2>")
        parts.append(
            f'<img alt="client-level epsilon over rounds" src="data:image/png;base64,{plots["epsilon"]}">'
            if plots["epsilon"] else "<p>No client-level events.</p>"
        )
        if client:
            parts.append(_table(
                ["accountant", "epsilon"],
                [[a, v if v is not None else "n/a (not applicable)"] for a, v in client["by_accountant"].items()],
            ))
        parts.append("<h2>Per-client sample-level epsilon</h2>")
        if plots["sample"]:
            parts.append(f'<img alt="per-client sample-level epsilon" src="data:image/png;base64,{plots["sample"]}">')
            parts.append(_table(
                ["client", f"epsilon ({d['accountant']})", f"cross-check ({sample['cross_check_accountant']})", "rounds", "steps"],
                [[c, v["epsilon"], v["cross_check"], v["rounds"], v["steps"]] for c, v in sample["per_client"].items()],
            ))
        else:
            parts.append("<p>No sample-level events.</p>")
        parts.append("<h2>Utility over rounds</h2>")
        parts.append(
            f'<img alt="utility over rounds" src="data:image/png;base64,{plots["utility"]}">'
            if plots["utility"] else "<p>No utility history given.</p>"
        )

        parts.append("<h2>Mechanisms and parameters</h2>")
        if d["mechanisms"]:
            parts.append(_table(
                ["mechanism", "level", "parameters", "uses", "rounds", "participants", "survivors", "details"],
                [[
                    m["mechanism"], m["level"], m["parameters"], m["uses"], m["rounds"],
                    m.get("participants", "—"), m.get("survivors", "—"),
                    {k: v for k, v in m.items() if k in ("clients", "steps", "sample_rate", "noise_multiplier_present", "l2_sensitivity", "clip_bound")} or "—",
                ] for m in d["mechanisms"]],
            ))
        else:
            parts.append("<p>None recorded.</p>")

        sa = d["secure_aggregation"]
        parts.append("<h2>Secure aggregation</h2>")
        parts.append(_table(["parameter", "value"], sa["parameters"].items()) if sa["parameters"] else "<p>No parameters given.</p>")
        parts.append("<h3>Observed dropouts</h3>")
        parts.append(
            _table(["round", "dropped", "clients"], [[x["round"], x["dropped"], ", ".join(x["ids"]) if x["ids"] else "—"] for x in sa["dropouts"]])
            if sa["dropouts"] else "<p>None reported.</p>"
        )
        if sa["rounds_below_min_clients"]:
            parts.append('<p class="warn">Rounds with fewer survivors than the distributed noise was sized for:</p>')
            parts.append(_table(["round", "survivors", "min_clients"], [[x["round"], x["survivors"], x["min_clients"]] for x in sa["rounds_below_min_clients"]]))

        parts.append("<h2>Model reveals</h2>")
        parts.append(
            _table(["round", "revealed", "why allowed"], [[r["round"], r["what"], r["why"]] for r in d["reveals"]])
            if d["reveals"] else "<p>No individual model was revealed.</p>"
        )
        parts.append("<h2>Assumptions</h2><ul>" + "".join(f"<li>{e(a)}</li>" for a in d["assumptions"]) + "</ul>")
        parts.append("</div>")
        return "".join(parts)

    def to_html(self) -> str:
        """One self-contained HTML page (inline CSS and base64 PNG plots, no external resources)."""
        return (
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
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
