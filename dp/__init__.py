"""Differential privacy for federated learning: a leaf library (imports neither fedcore nor secagg).

- Sample-level DP-SGD on a client through Opacus, behind one adapter: ``SampleLevelDP``,
  with our one-pass per-sample clipping for embedding-heavy models (``clipping="embedding"``)
  and, opt-in for plain SGD, deferred noise for embedding rows (``lazy_noise=True``).
- Client-level DP (DP-FedAvg): ``L2Clip`` / ``AdaptiveClip``; ``CentralGaussian`` noise by
  the server, or ``SkellamNoise`` / ``DiscreteGaussianNoise`` added by clients before masking.
- Every mechanism use is an immutable event in an append-only ``Ledger``; accountants
  (``epsilon``, ``sample_level_epsilons``; PLD by default, RDP as the cross-check), a
  ``PrivacyBudget``, noise calibration with the same accountant, and a ``PrivacyReport``
  (JSON + self-contained HTML) read the ledger.
- Private hyperparameter tuning (Papernot & Steinke ICLR 2022): ``TrialDistribution``,
  ``tuning_rdp`` and a ``TuningEvent`` whose RDP bound covers the best of a random number of trials.
- ``dp.audit``: a one-run canary audit giving an empirical lower bound on epsilon, shown in the
  report beside the accountant's figure and flagged (``PrivacyAuditWarning``) when above it.
"""

from ._accounting import (
    ACCOUNTANTS,
    RDP_ORDERS,
    accountant_used,
    effective_noise_multiplier,
    epsilon,
    epsilon_by_accountant,
    rdp_curve,
    sample_level_epsilons,
)
from ._budget import BUDGET_LEVELS, PrivacyBudget
from ._calibration import calibrate_for_runs, calibrate_noise_multiplier, smallest_noise_multiplier
from ._clipping import AdaptiveClip, L2Clip
from ._errors import (
    AccountingError,
    BudgetExceededError,
    DPError,
    DPTypeError,
    DPValueError,
    PrivacyAuditWarning,
    UnsupportedModelError,
)
from ._events import (
    SAMPLINGS,
    DiscreteGaussianEvent,
    Event,
    GaussianEvent,
    QuantileEvent,
    SampleLevelEvent,
    SkellamEvent,
    TuningEvent,
    event_from_dict,
    event_to_dict,
)
from ._fastclip import PackedEmbedding
from ._ledger import LEDGER_SCHEMA, Ledger
from ._noise import CentralGaussian, DiscreteGaussianNoise, SkellamNoise
from ._opacus import CLIPPING_MODES, PrivateTraining, SampleLevelDP, bert_dp_inputs, resolve_clipping
from ._report import REPORT_SCHEMA, PrivacyReport, ReportPaths, Reveal
from ._tuning import TRIAL_DISTRIBUTIONS, TrialDistribution, tuning_rdp

__all__ = [
    # sample-level
    "SampleLevelDP",
    "PrivateTraining",
    "CLIPPING_MODES",
    "resolve_clipping",
    "bert_dp_inputs",
    "PackedEmbedding",
    # client-level
    "L2Clip",
    "AdaptiveClip",
    "CentralGaussian",
    "SkellamNoise",
    "DiscreteGaussianNoise",
    # events and ledger
    "Event",
    "GaussianEvent",
    "QuantileEvent",
    "SampleLevelEvent",
    "SkellamEvent",
    "DiscreteGaussianEvent",
    "TuningEvent",
    "SAMPLINGS",
    "event_to_dict",
    "event_from_dict",
    "Ledger",
    "LEDGER_SCHEMA",
    # accounting, budget, calibration
    "ACCOUNTANTS",
    "RDP_ORDERS",
    "epsilon",
    "epsilon_by_accountant",
    "accountant_used",
    "effective_noise_multiplier",
    "sample_level_epsilons",
    "rdp_curve",
    "PrivacyBudget",
    "BUDGET_LEVELS",
    "calibrate_noise_multiplier",
    "calibrate_for_runs",
    "smallest_noise_multiplier",
    # private hyperparameter tuning (Papernot & Steinke 2022)
    "TrialDistribution",
    "TRIAL_DISTRIBUTIONS",
    "tuning_rdp",
    # report
    "PrivacyReport",
    "Reveal",
    "ReportPaths",
    "REPORT_SCHEMA",
    # errors
    "DPError",
    "DPValueError",
    "DPTypeError",
    "AccountingError",
    "BudgetExceededError",
    "UnsupportedModelError",
    "PrivacyAuditWarning",
]
from ._user_level import UserLevelDP, UserLevelTraining, clipped_user_gradients  # noqa: E402  (user-level DP)

__all__ += ["UserLevelDP", "UserLevelTraining", "clipped_user_gradients"]
