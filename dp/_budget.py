"""Privacy budget: stop before a configured (epsilon, delta) would be exceeded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from . import _checks as chk
from ._accounting import ACCOUNTANTS, _client_events, _epsilon_groups, _events_of, _groups, _per_client
from ._errors import BudgetExceededError, DPValueError
from ._events import Event
from ._ledger import Ledger

__all__ = ["PrivacyBudget", "BUDGET_LEVELS"]

#: ``"all"``: every level the ledger holds; ``"client"`` / ``"sample"``: that level only.
BUDGET_LEVELS = ("all", "client", "sample")


@dataclass(frozen=True, kw_only=True)
class PrivacyBudget:
    """An (epsilon, delta) budget checked against the ledger before each round.

    A budget binds every event it is shown: ``level="all"`` (the default) limits the
    client-level epsilon of the federation *and* each client's sample-level (DP-SGD) epsilon,
    each to ``epsilon`` (two separate guarantees, each within the budget). ``level="client"``
    or ``"sample"`` limits that level only and refuses a history holding events of the other
    level, so a budget can never silently ignore a mechanism in use.

    Attributes:
        epsilon: the most epsilon that may be spent.
        delta: the delta the budget is stated at.
        accountant: ``"pld"`` (default), ``"rdp"``, ``"prv"`` or ``"tightest"`` (see ``dp.epsilon``).
        level: ``"all"``, ``"client"`` or ``"sample"``.

    Raises:
        DPValueError: a parameter out of range, or (from every method) a history holding
            events of a level the budget does not cover.
    """

    epsilon: float
    delta: float
    accountant: str = "pld"
    level: str = "all"

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", chk.positive("epsilon", self.epsilon))
        object.__setattr__(self, "delta", chk.open_unit("delta", self.delta))
        chk.one_of("accountant", self.accountant, ACCOUNTANTS)
        chk.one_of("level", self.level, BUDGET_LEVELS)

    # -- what the budget binds --------------------------------------------------------------

    def _covered(self, events: Sequence[Event]) -> tuple[list[Event], dict[str, list[Event]]]:
        client, per = _client_events(events), _per_client(events)
        other = {"client": ("sample", sum(len(v) for v in per.values())), "sample": ("client", len(client))}.get(self.level)
        if other is not None and other[1]:
            kind = "sample-level (DP-SGD)" if other[0] == "sample" else "client-level"
            raise DPValueError(
                f"a PrivacyBudget with level={self.level!r} does not cover the {other[1]} {kind} event(s) in the "
                f"history, so they would spend privacy unchecked; use level='all' (the default), or "
                f"level={other[0]!r} for a budget of that level only"
            )
        return client, per

    def _eps(self, events: Sequence[Event], extra: Sequence[Event] = (), repeats: int = 1) -> float:
        groups = _groups(events)
        groups.update(_groups(extra, repeat=repeats))
        return _epsilon_groups(groups, self.delta, self.accountant)

    # -- spend -----------------------------------------------------------------------------

    def spent_by_level(self, ledger_or_events: Ledger | Iterable[Event]) -> dict[str, float]:
        """``{"client": epsilon, "sample": largest per-client epsilon}`` for the levels the budget covers."""
        client, per = self._covered(_events_of(ledger_or_events))
        out: dict[str, float] = {}
        if self.level in ("all", "client"):
            out["client"] = self._eps(client)
        if self.level in ("all", "sample"):
            out["sample"] = max((self._eps(v) for v in per.values()), default=0.0)
        return out

    def spent(self, ledger_or_events: Ledger | Iterable[Event]) -> float:
        """Epsilon spent so far: the largest figure over the levels the budget covers."""
        return max(self.spent_by_level(ledger_or_events).values())

    def remaining(self, ledger_or_events: Ledger | Iterable[Event]) -> float:
        """Budget left (never negative)."""
        return max(0.0, self.epsilon - self.spent(ledger_or_events))

    def check(
        self, ledger_or_events: Ledger | Iterable[Event], next_events: Iterable[Event] = (), *, what: str = "the next round"
    ) -> float:
        """Raise if recording ``next_events`` would exceed the budget; else return the would-be epsilon.

        Plan ``next_events`` for the worst case the protocol allows (``plan`` of the noise
        stages: the fewest survivors), so that what is recorded afterwards never costs more.
        ``what`` names them in the error (a private search says which, and its distribution).

        Raises:
            BudgetExceededError: with the budget, the spend so far and the next round's cost.
        """
        client, per = self._covered(_events_of(ledger_or_events))
        nxt_client, per_next = self._covered(_events_of(next_events))
        worst = 0.0
        if self.level in ("all", "client"):
            spent = self._eps(client)
            would_be = self._eps(client, nxt_client) if nxt_client else spent
            if would_be > self.epsilon:
                raise BudgetExceededError(
                    budget_epsilon=self.epsilon, delta=self.delta, spent=spent, would_be=would_be,
                    accountant=self.accountant, level="client", what=what,
                )  # fmt: skip
            worst = would_be
        if self.level in ("all", "sample"):
            worst = max([worst] + [self._eps(v) for v in per.values()])
            for cid in sorted(per_next):
                base = per.get(cid, [])
                would_be = self._eps(base, per_next[cid])
                if would_be > self.epsilon:
                    raise BudgetExceededError(
                        budget_epsilon=self.epsilon, delta=self.delta, spent=self._eps(base), would_be=would_be,
                        accountant=self.accountant, level="sample", client_id=cid, what=what,
                    )  # fmt: skip
                worst = max(worst, would_be)
        return worst

    def rounds_that_fit(
        self,
        ledger_or_events: Ledger | Iterable[Event],
        round_events: Iterable[Event],
        *,
        max_rounds: int = 1_000_000,
    ) -> int:
        """How many more rounds, each recording ``round_events``, fit in the budget.

        Returns the largest ``k <= max_rounds`` such that the ledger plus ``k`` copies of
        ``round_events`` stays within the budget (0 if even one round does not fit).
        """
        client, per = self._covered(_events_of(ledger_or_events))
        rnd_client, per_next = self._covered(_events_of(round_events))
        limit = chk.integer("max_rounds", max_rounds, minimum=0)

        def fits(k: int) -> bool:
            if k == 0:
                return True
            if self.level in ("all", "client") and rnd_client and self._eps(client, rnd_client, k) > self.epsilon:
                return False
            if self.level in ("all", "sample"):
                return all(self._eps(per.get(c, []), per_next[c], k) <= self.epsilon for c in per_next)
            return True

        if not fits(1):
            return 0
        lo, hi = 1, 2
        while hi <= limit and fits(hi):
            lo, hi = hi, hi * 2
        if hi > limit:
            if fits(limit):
                return limit
            hi = limit
        while hi - lo > 1:  # fits(lo) and not fits(hi)
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return lo
