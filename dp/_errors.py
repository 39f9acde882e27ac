"""The exception tree of the ``dp`` package.

Every error the package raises on purpose is a ``DPError``; bad parameters are also
``ValueError`` / ``TypeError`` so that plain ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "DPError",
    "DPValueError",
    "DPTypeError",
    "BudgetExceededError",
    "AccountingError",
    "UnsupportedModelError",
    "PrivacyAuditWarning",
]


class DPError(Exception):
    """Base class of every error raised on purpose by ``dp``."""


class DPValueError(DPError, ValueError):
    """A parameter has a value outside what is allowed (the message names both)."""


class DPTypeError(DPError, TypeError):
    """A parameter has the wrong type (the message names the expected type)."""


class AccountingError(DPError):
    """An accountant cannot account for a history (for example PRV asked about Skellam)."""


class UnsupportedModelError(DPError):
    """A model or layer cannot be trained with the requested per-sample clipping mode."""


class BudgetExceededError(DPError):
    """Training would exceed the privacy budget.

    Attributes:
        budget_epsilon: the epsilon of the budget.
        delta: the delta the budget is stated at.
        spent: epsilon spent by the ledger so far.
        would_be: epsilon after the next round's events.
        next_cost: ``would_be - spent``, what the next round would cost.
        client_id: for a sample-level budget, the client that would exceed it.
        what: what was about to spend (``"the next round"``, or a private search and its distribution).
    """

    def __init__(
        self,
        *,
        budget_epsilon: float,
        delta: float,
        spent: float,
        would_be: float,
        accountant: str,
        level: str,
        client_id: str | None = None,
        what: str = "the next round",
    ) -> None:
        self.budget_epsilon = float(budget_epsilon)
        self.delta = float(delta)
        self.spent = float(spent)
        self.would_be = float(would_be)
        self.next_cost = float(would_be) - float(spent)
        self.accountant = accountant
        self.level = level
        self.client_id = client_id
        self.what = what
        who = f"client {client_id!r} " if client_id is not None else ""
        super().__init__(
            f"{level}-level privacy budget (epsilon={self.budget_epsilon:.6g}, delta={self.delta:.3g}) "
            f"would be exceeded: {who}spent epsilon={self.spent:.6g} so far, {what} would cost "
            f"{self.next_cost:.6g} more (total {self.would_be:.6g}, over budget by "
            f"{self.would_be - self.budget_epsilon:.6g}; accountant {accountant!r})"
        )


class PrivacyAuditWarning(UserWarning):
    """An audited lower bound on epsilon exceeds the epsilon the accountant claims."""
