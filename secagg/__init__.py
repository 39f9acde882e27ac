"""Secure aggregation: masked sums (SecAgg / SecAgg+) and homomorphic sums (CKKS, BFV).

A leaf library: it imports neither :mod:`fedcore` nor :mod:`dp`. The public surface is the
recipes, one per protection mode, each a :class:`SecureSum` that :class:`PlaintextSum` (the
reference) must equal: :class:`MaskedSum`, :class:`CKKSSum`, :class:`BFVSum`,
:class:`SelectiveSum`; with their presets and planners, the round-session API a federation
drives them with (:mod:`secagg.session`), and the errors. The protocol internals sit beneath, in
their modules: :mod:`secagg.protocol` (SecAgg clients and server), :mod:`secagg.messages` (the
wire formats), :mod:`secagg.graph` (SecAgg+ graphs), :mod:`secagg.encoding` (fixed-point
encoding), :mod:`secagg.ckks` and :mod:`secagg.bfv` (HE clients, key holders, server),
:mod:`secagg.shamir`.
"""

from .base import IntegerNoise, PlaintextSum, SecureSum, Stage, SumResult
from .bfv import BFV_PRESETS, BFVSum, bfv_preset
from .ckks import CKKS_PRESETS, CKKSSum, ckks_preset
from .errors import DropoutError, KeyMaterialError, OverflowRiskError, ProtocolError, SecAggError
from .graph import plan_complete, plan_secagg_plus
from .masked import MaskedSum
from .selective import SelectiveSum, select_by_name, select_indices, select_top_fraction
from .session import KEY_HOLDER, ClientKeys, ClientSession, Respond, ServerSession, drive_round

__all__ = [
    # recipes, one per protection mode
    "PlaintextSum",
    "MaskedSum",
    "CKKSSum",
    "BFVSum",
    "SelectiveSum",
    "select_by_name",
    "select_indices",
    "select_top_fraction",
    # presets and planners
    "CKKS_PRESETS",
    "ckks_preset",
    "BFV_PRESETS",
    "bfv_preset",
    "plan_complete",
    "plan_secagg_plus",
    # what every recipe is and returns
    "SecureSum",
    "SumResult",
    "Stage",
    "IntegerNoise",
    # round sessions (how a federation drives a recipe over bytes)
    "KEY_HOLDER",
    "ClientKeys",
    "ClientSession",
    "ServerSession",
    "Respond",
    "drive_round",
    # errors
    "SecAggError",
    "DropoutError",
    "KeyMaterialError",
    "OverflowRiskError",
    "ProtocolError",
]
