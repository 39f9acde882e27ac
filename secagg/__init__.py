"""Secure aggregation: masked sums (SecAgg / SecAgg+) and homomorphic sums (CKKS, BFV).

A leaf library: it imports neither :mod:`fedcore` nor :mod:`dp`. Every backend implements
:class:`SecureSum`; :class:`PlaintextSum` is the reference the others must equal.
"""

from .base import IntegerNoise, PlaintextSum, SecureSum, Stage, SumResult, check_updates

# masked exports: end
# homomorphic (CKKS / BFV) exports: begin
from .bfv import BFV_PRESETS, BFVClient, BFVEncoder, BFVKeyHolder, BFVPreset, BFVSum, bfv_preset
from .ckks import CKKS_PRESETS, CKKSClient, CKKSKeyHolder, CKKSPreset, CKKSSum, DecryptedSum, HEServer, ckks_preset

# masked (SecAgg / SecAgg+) exports: begin
from .encoding import FixedPointEncoder
from .errors import DropoutError, KeyMaterialError, OverflowRiskError, ProtocolError, SecAggError
from .graph import SecAggPlan, neighbours, plan_complete, plan_secagg_plus, round_completes, simulate_completion
from .masked import MaskedSum
from .messages import (
    KeyAdvertisement,
    KeyList,
    MaskedInput,
    MessageKind,
    RoundSetup,
    SealedShare,
    ShareBundle,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
    decode_message,
)
from .protocol import IntegerSumResult, SecAggClient, SecAggServer, secure_sum_integers
from .selective import Selection, SelectiveSum, select_by_name, select_indices, select_top_fraction
from .session import KEY_HOLDER, ClientKeys, ClientSession, Respond, ServerSession, drive_round

# homomorphic exports: end

__all__ = [
    "KEY_HOLDER",
    "ClientKeys",
    "ClientSession",
    "Respond",
    "ServerSession",
    "drive_round",
    "BFV_PRESETS",
    "BFVClient",
    "BFVEncoder",
    "BFVKeyHolder",
    "BFVPreset",
    "BFVSum",
    "bfv_preset",
    "CKKS_PRESETS",
    "CKKSClient",
    "CKKSKeyHolder",
    "CKKSPreset",
    "CKKSSum",
    "DecryptedSum",
    "HEServer",
    "ckks_preset",
    "Selection",
    "SelectiveSum",
    "select_by_name",
    "select_indices",
    "select_top_fraction",
    "FixedPointEncoder",
    "IntegerSumResult",
    "KeyAdvertisement",
    "KeyList",
    "MaskedInput",
    "MaskedSum",
    "MessageKind",
    "RoundSetup",
    "SealedShare",
    "SecAggClient",
    "SecAggPlan",
    "SecAggServer",
    "ShareBundle",
    "ShareDelivery",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode_message",
    "neighbours",
    "plan_complete",
    "plan_secagg_plus",
    "round_completes",
    "secure_sum_integers",
    "simulate_completion",
    "DropoutError",
    "IntegerNoise",
    "KeyMaterialError",
    "OverflowRiskError",
    "PlaintextSum",
    "ProtocolError",
    "SecAggError",
    "SecureSum",
    "Stage",
    "SumResult",
    "check_updates",
]
