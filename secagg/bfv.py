"""Exact integer sums of quantized updates under BFV (SEAL through ``tenseal.sealapi``).

Each client quantizes its clipped, weighted vector to signed integers of ``quant_bits`` bits
(stochastic rounding, so the quantized value is unbiased), packs N integers per ciphertext
(batching) and encrypts with seeded symmetric encryption. The server adds ciphertexts; the key
holder decrypts the exact integer sum, which it turns back into floats. Unlike CKKS the sum of
the integers is exact; the only error is quantization (less than one step per client).

The encoder states the largest client count a preset supports and refuses more: the sum must
stay inside the plain modulus (``count * levels <= (t - 1) / 2``) and the summed encryption
noise must stay below ``q / (4 t)`` (half of BFV's decryption margin ``q / (2 t)``; a seeded
symmetric ciphertext's noise is at most 21 per coefficient plus 1/2 from SEAL's rounding of
``q m / t``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np

from ._he_core import (
    NOISE_MAX,
    ClientBase,
    DecryptedSum,
    HEClientSession,
    HEServer,
    HEServerSession,
    KeyFields,
    KeyHolderBase,
    KeyHolderSession,
    data_modulus,
    he_context,
    run_session_round,
)
from ._he_seal import plain_modulus_value
from .base import Stage, SumResult
from .errors import KeyMaterialError, OverflowRiskError
from .session import ClientKeys

__all__ = [
    "BFVPreset",
    "BFV_PRESETS",
    "bfv_preset",
    "BFVEncoder",
    "BFVKeyHolder",
    "BFVClient",
    "BFVSum",
    "HEServer",
    "DecryptedSum",
]


@dataclass(frozen=True)
class BFVPreset:
    """A named BFV parameter set for exact integer aggregation.

    Attributes:
        name: registry key.
        poly_modulus_degree: N, which is also the number of integer slots per ciphertext.
        coeff_mod_bit_sizes: bit sizes of the ciphertext-modulus primes.
        plain_modulus_bits: bits of the batching-friendly plain modulus prime t.
        summary: one line for reports.
        security_bits: classical security level (HE standard; SEAL enforces it).
    """

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    plain_modulus_bits: int
    summary: str
    security_bits: int = 128

    @property
    def slots(self) -> int:
        """Integers per ciphertext (batching slots: the polynomial degree)."""
        return self.poly_modulus_degree

    @property
    def plain_modulus(self) -> int:
        """The prime t SEAL picks (t = 1 mod 2N, so batching works)."""
        return plain_modulus_value(self.poly_modulus_degree, self.plain_modulus_bits)

    @property
    def noise_client_limit(self) -> int:
        """Most ciphertexts whose summed noise stays below q / (4 t)."""
        q = data_modulus(self.poly_modulus_degree, self.coeff_mod_bit_sizes)
        return int(q // (4 * self.plain_modulus) // (NOISE_MAX + 1))


BFV_PRESETS: Mapping[str, BFVPreset] = MappingProxyType(
    {
        "bfv": BFVPreset(
            name="bfv",
            poly_modulus_degree=4096,
            coeff_mod_bit_sizes=(60,),
            plain_modulus_bits=40,
            summary="BFV N=4096, one 60-bit prime, 40-bit plain modulus, seeded symmetric ciphertexts",
        ),
    }
)


def bfv_preset(name: str | BFVPreset) -> BFVPreset:
    """Look up a preset by name (a :class:`BFVPreset` passes through).

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    if isinstance(name, BFVPreset):
        return name
    if not isinstance(name, str) or name not in BFV_PRESETS:
        raise ValueError(f"preset must be one of {sorted(BFV_PRESETS)}, got {name!r}")
    return BFV_PRESETS[name]


class BFVEncoder:
    """Fixed point: [-value_bound, value_bound] onto integers in [-levels, levels].

    ``levels = 2**(quant_bits - 1) - 1`` and ``step = value_bound / levels``. Stochastic
    rounding (randomness from the caller's generator) keeps each quantized value unbiased and
    within one step of the input.

    Attributes:
        max_clients: the largest client count this preset and ``quant_bits`` support; the
            smaller of the plain-modulus range limit and the noise limit.

    Raises (constructor):
        ValueError / TypeError: a bad value_bound or quant_bits, or a quant_bits so large that
            not even one client fits the plain modulus.
    """

    def __init__(self, preset: str | BFVPreset = "bfv", *, value_bound: float, quant_bits: int = 20) -> None:
        self.preset = bfv_preset(preset)
        if isinstance(value_bound, bool) or not isinstance(value_bound, (int, float)):
            raise TypeError(f"value_bound must be a number, got {value_bound!r}")
        if not (math.isfinite(value_bound) and value_bound > 0):
            raise ValueError(f"value_bound must be finite and > 0, got {value_bound!r}")
        if isinstance(quant_bits, bool) or not isinstance(quant_bits, int):
            raise TypeError(f"quant_bits must be an int, got {quant_bits!r}")
        if not 2 <= quant_bits <= self.preset.plain_modulus_bits - 1:
            raise ValueError(
                f"quant_bits must be in [2, {self.preset.plain_modulus_bits - 1}] for preset "
                f"{self.preset.name!r} (plain modulus of {self.preset.plain_modulus_bits} bits), got {quant_bits}"
            )
        self.value_bound = float(value_bound)
        self.quant_bits = quant_bits
        self.levels = 2 ** (quant_bits - 1) - 1
        self.step = self.value_bound / self.levels
        self.range_client_limit = ((self.preset.plain_modulus - 1) // 2) // self.levels
        self.max_clients = min(self.range_client_limit, self.preset.noise_client_limit)

    def check_clients(self, num_clients: int) -> None:
        """Raises OverflowRiskError, naming the limits, if ``num_clients`` exceeds :attr:`max_clients`."""
        if num_clients > self.max_clients:
            raise OverflowRiskError(
                f"preset {self.preset.name!r} with quant_bits={self.quant_bits} supports at most "
                f"{self.max_clients} clients (plain modulus t={self.preset.plain_modulus}: "
                f"{self.range_client_limit} sums of |x| <= {self.levels} fit in (t-1)/2; noise allows "
                f"{self.preset.noise_client_limit}), got max_clients={num_clients}"
            )

    def encode(self, values: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
        """Stochastically round ``values / step`` to int64 in [-levels, levels]."""
        return quantize(values, step=self.step, levels=self.levels, rng=rng)

    def decode(self, integers: np.ndarray) -> np.ndarray:
        """Integers (a sum of encodings) back to float64."""
        return np.asarray(integers, dtype=np.float64) * self.step

    def max_abs_error(self, num_clients: int) -> float:
        """Bound on |decoded sum - exact sum| per coordinate: below one step per client."""
        return num_clients * self.step * (1 + 1e-9)


def quantize(values: np.ndarray, *, step: float, levels: int, rng: np.random.Generator) -> np.ndarray:
    """Unbiased stochastic rounding of ``values / step``, clipped to [-levels, levels]."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    scaled = np.asarray(values, dtype=np.float64) / step
    low = np.floor(scaled)
    up = rng.random(scaled.shape) < (scaled - low)
    return np.clip(low + up, -levels, levels).astype(np.int64)


def _info_fields(encoder: BFVEncoder, *, max_clients: int) -> KeyFields:
    preset = encoder.preset
    return {
        "scheme": "bfv",
        "preset": preset.name,
        "engine": "sealapi",
        "encryption": "symmetric",
        "poly_modulus_degree": preset.poly_modulus_degree,
        "coeff_mod_bit_sizes": preset.coeff_mod_bit_sizes,
        "plain_modulus_bits": preset.plain_modulus_bits,
        "reals_per_slot": 1,
        "values_per_ciphertext": preset.slots,
        "scale": 1.0 / encoder.step,
        "value_bound": encoder.value_bound,
        "max_clients": max_clients,
        "quant_bits": encoder.quant_bits,
        "step": encoder.step,
        "levels": encoder.levels,
    }


def _check_max_clients(max_clients: int) -> None:
    if isinstance(max_clients, bool) or not isinstance(max_clients, int):
        raise TypeError(f"max_clients must be an int, got {max_clients!r}")
    if max_clients < 1:
        raise ValueError(f"max_clients must be >= 1, got {max_clients!r}")


class BFVKeyHolder(KeyHolderBase):
    """Creates a BFV key set and decrypts aggregates to exact integer sums.

    Raises:
        OverflowRiskError: ``max_clients`` beyond what the preset and ``quant_bits`` support.
    """

    def __init__(
        self,
        preset: str | BFVPreset = "bfv",
        *,
        value_bound: float,
        max_clients: int,
        quant_bits: int = 20,
        name: str = "key-service",
    ) -> None:
        self.encoder = BFVEncoder(preset, value_bound=value_bound, quant_bits=quant_bits)
        _check_max_clients(max_clients)
        self.encoder.check_clients(max_clients)
        self.preset = self.encoder.preset
        super().__init__(_info_fields(self.encoder, max_clients=max_clients), name=name)


class BFVClient(ClientBase):
    """A client: quantizes and encrypts its vector into bytes for the server."""

    def __init__(self, client_context: bytes, *, client_id: str) -> None:
        super().__init__(client_context, client_id=client_id, scheme="bfv")

    def encrypt(
        self, update: np.ndarray, *, rng: np.random.Generator, weight: float = 1.0, round_index: int | None = None
    ) -> bytes:
        """Quantize ``update`` (already weighted) with stochastic rounding from ``rng`` and encrypt it.

        ``round_index`` binds the message to one round (a server made for that round refuses others).

        Raises:
            ValueError: NaN/Inf, a coordinate beyond value_bound, or a bad weight.
        """
        length = self._check_vector(update)
        step, levels = self._info.quantization()
        ints = quantize(update, step=step, levels=levels, rng=rng)
        return self._seal(self._padded(ints, np.int64), length=length, weight=weight, round_index=round_index)


class BFVSum:
    """BFV-encrypted secure sum of quantized vectors (implements :class:`SecureSum`).

    ``total`` is the exact integer sum times the quantization step; ``max_abs_error`` is the
    quantization bound (count x step). The parties' halves are :meth:`key_holder_session`,
    :meth:`client_session` (it quantizes with its own ``rng``) and :meth:`server_session`, as for
    :class:`secagg.CKKSSum`; :meth:`aggregate` runs them in this process.

    Raises (constructor):
        OverflowRiskError: ``max_clients`` beyond the preset's supported count at ``quant_bits``.
    """

    mode = "bfv"

    def __init__(
        self,
        *,
        value_bound: float,
        max_clients: int,
        preset: str | BFVPreset = "bfv",
        quant_bits: int = 20,
        key_holder: str | None = None,
    ) -> None:
        self.encoder = BFVEncoder(preset, value_bound=value_bound, quant_bits=quant_bits)
        _check_max_clients(max_clients)
        self.encoder.check_clients(max_clients)
        if key_holder is not None and (not isinstance(key_holder, str) or not key_holder):
            raise TypeError(f"key_holder must be None (a separate key service) or a client id str, got {key_holder!r}")
        self.preset = self.encoder.preset
        self.value_bound = float(value_bound)
        self.max_clients = max_clients
        self.quant_bits = quant_bits
        self.key_holder = key_holder
        holder = f"client {key_holder!r}'s party" if key_holder is not None else "a separate key service"
        self.trust_model = (
            f"Homomorphic encryption (BFV, preset {self.preset.name!r}, 128-bit security; honest-but-curious "
            f"server): each round {holder} makes fresh keys. The server holds only the public parameters and "
            "refuses any context holding the secret key; it sees each client's ciphertext with its id, vector "
            "length and declared weight, adds them, and learns the released sum. BFV decryption is exact: the "
            "key holder decrypts one aggregate per key set and releases the exact integer sum of the quantized "
            "updates, which carries nothing about the key or the encryption noise. Every client holds the "
            "secret key (seeded symmetric encryption), so any client, or the key holder, colluding with the "
            "server can decrypt any individual update; if the key holder is silent, the server asks one "
            "contributor at a time to decrypt instead. Message digests detect corruption, not an active "
            "attacker: a malicious server can alter the aggregate, or pass one client's ciphertext off as the "
            "aggregate, and the key holder cannot tell."
        )

    def key_holder_session(self, *, round_index: int) -> KeyHolderSession:
        """The key holder party of one round: fresh keys, contexts for server and clients, one decryption."""
        name = self.key_holder if self.key_holder is not None else "key-service"
        holder = BFVKeyHolder(
            self.preset, value_bound=self.value_bound, max_clients=self.max_clients, quant_bits=self.quant_bits, name=name
        )
        return KeyHolderSession(holder, round_index=round_index)

    def client_session(
        self,
        client_id: str,
        *,
        round_index: int,
        participants: Sequence[str],
        rng: np.random.Generator,
        keys: ClientKeys | None,
    ) -> HEClientSession:
        """A client's half: quantizes with its own ``rng`` (stochastic rounding) and encrypts.

        Raises:
            KeyMaterialError: no HE context in ``keys``, or one this client cannot encrypt with.
            TypeError: ``rng`` is not a numpy Generator.
        """
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        client = BFVClient(he_context(keys, client_id), client_id=client_id)
        return HEClientSession(
            client,
            round_index=round_index,
            participants=participants,
            encrypt=lambda vec: client.encrypt(vec, rng=rng, round_index=round_index),
        )

    def server_session(
        self, *, round_index: int, participants: Sequence[str], length: int, public_context: bytes | None = None
    ) -> HEServerSession:
        """The server's half; ``public_context`` is the key holder's ``server_context()``."""
        if public_context is None:
            raise KeyMaterialError("a BFV server session needs the key holder's server_context() bytes, got None")
        return HEServerSession(
            round_index=round_index, participants=participants, length=length, public_context=public_context, mode=self.mode
        )

    def aggregate(
        self,
        updates: Mapping[str, np.ndarray],
        *,
        round_index: int,
        rng: np.random.Generator,
        dropouts: Mapping[str, Stage] | None = None,
    ) -> SumResult:
        """Run one round through the parties' sessions; ``rng`` is split among the clients' roundings."""
        return run_session_round(
            self,
            updates,
            round_index=round_index,
            rng=rng,
            dropouts=dropouts,
            value_bound=self.value_bound,
            max_clients=self.max_clients,
            key_holder=self.key_holder,
        )

    def describe(self) -> dict[str, object]:
        """Preset, parameters, encoder scale and bytes per parameter, for reports."""
        return {
            "mode": self.mode,
            "preset": self.preset.name,
            "summary": self.preset.summary,
            "engine": "tenseal.sealapi (SEAL)",
            "encryption": "symmetric (seeded)",
            "poly_modulus_degree": self.preset.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.preset.coeff_mod_bit_sizes),
            "modulus_bits": sum(self.preset.coeff_mod_bit_sizes),
            "plain_modulus": self.preset.plain_modulus,
            "slots": self.preset.slots,
            "security_bits": self.preset.security_bits,
            "quant_bits": self.quant_bits,
            "step": self.encoder.step,
            "value_bound": self.value_bound,
            "max_clients": self.max_clients,
            "max_clients_supported": self.encoder.max_clients,
            "max_abs_error_at_max_clients": self.encoder.max_abs_error(self.max_clients),
            "key_holder": self.key_holder if self.key_holder is not None else "separate key service",
        }
