"""Homomorphic-encrypted aggregation with CKKS (SEAL through TenSEAL).

Clients encrypt their already clipped and weighted update; the server, holding only a public
context, adds ciphertexts; the key holder decrypts the aggregate. Addition-only aggregation needs
no relinearisation or Galois keys, so none are made.

Presets (frozen :class:`CKKSPreset`, all at 128-bit security by the HE standard's tables, which
SEAL enforces when it builds the context):

``compact``
    N=4096, one 50-bit prime, two reals per complex slot (4,096 values per ciphertext), seeded
    symmetric ciphertexts (the second polynomial travels as a 64-byte seed), via
    ``tenseal.sealapi``. About 7.2 bytes per parameter up. Clients hold the secret key.
``compact-pk``
    The same parameters with public-key encryption: clients hold only the public key, so a client
    colluding with the server learns nothing more; uploads are about twice as large (no seed).
``compat``
    N=8192, moduli [60, 40, 40], scale 2^40, one real per slot, public-key encryption, through
    ``tenseal.ckks_vector`` (NVIDIA FLARE's defaults), for interoperability and comparison.

The scale of the compact presets is the largest power of two for which the sum of
``max_clients`` vectors bounded by ``value_bound`` cannot wrap around the modulus; settings for
which that scale would fall below the preset's minimum are refused, naming the numbers.

What leaves the key holder: never the raw decryption, from which the server that computed the
aggregate solves for the secret key (Li and Micciancio, EUROCRYPT 2021). Clients round their
inputs to a public grid whose spacing is a power of two above four times the decryption's noise
bound (:func:`secagg._he_core.ckks_release_grid`), so the key holder rounds the decryption back to
the grid and releases the exact sum of the rounded inputs, a function of the inputs alone; a
decryption farther from the grid than the noise allows is refused. This is the issue's "release
only values rounded far above the noise", chosen over noise flooding: flooding sized by Li,
Micciancio, Schultz and Sorrell (CRYPTO 2022) at 40 statistical bits measured 1.4e-4 (d=1e5, 10
clients, 59-bit prime) and 4.9 on ``compat`` (d=3000), against 4.6e-7 and 1.1e-4 here. The stated
``max_abs_error`` is the clients' rounding (a grid step of 2^-21 for 12 clients of
``value_bound`` 1 on ``compact``: 2.9e-6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np

from ._he_core import (
    ClientBase,
    DecryptedSum,
    HEClientSession,
    HEServer,
    HEServerSession,
    KeyFields,
    KeyHolderBase,
    KeyHolderSession,
    ckks_largest_scale_bits,
    ckks_release_grid,
    ckks_rounding_error,
    data_modulus,
    he_context,
    run_session_round,
    snap_to_grid,
)
from .base import Stage, SumResult
from .errors import KeyMaterialError, OverflowRiskError
from .session import ClientKeys

__all__ = [
    "CKKSPreset",
    "CKKS_PRESETS",
    "ckks_preset",
    "CKKSKeyHolder",
    "CKKSClient",
    "HEServer",
    "DecryptedSum",
    "CKKSSum",
    "KeyHolderSession",
]


@dataclass(frozen=True)
class CKKSPreset:
    """A named CKKS parameter set for aggregation.

    Attributes:
        name: registry key.
        poly_modulus_degree: N; a ciphertext has N/2 complex slots.
        coeff_mod_bit_sizes: bit sizes of the coefficient-modulus primes (the last is SEAL's
            special prime when there is more than one).
        reals_per_slot: 2 packs two reals into one complex slot (real and imaginary part).
        encryption: "symmetric" (seeded, clients hold the secret key) or "public-key".
        engine: "sealapi" (low-level SEAL binding) or "tenseal" (``ts.ckks_vector``).
        scale_bits: fixed log2 scale, or None to choose it from value_bound and max_clients.
        min_scale_bits: smallest log2 scale accepted when choosing it.
        summary: one line for reports.
        security_bits: classical security level of the parameters (HE standard).
    """

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    reals_per_slot: int
    encryption: str
    engine: str
    scale_bits: int | None
    min_scale_bits: int
    summary: str
    security_bits: int = 128

    @property
    def slots(self) -> int:
        """Complex slots per ciphertext (half the polynomial degree)."""
        return self.poly_modulus_degree // 2

    @property
    def values_per_ciphertext(self) -> int:
        """Real values packed into one ciphertext."""
        return self.slots * self.reals_per_slot

    @property
    def modulus_bits(self) -> int:
        """Total bits of the coefficient modulus (bounded by the security level)."""
        return sum(self.coeff_mod_bit_sizes)

    @property
    def clients_hold_secret_key(self) -> bool:
        """Whether clients encrypt with the secret key (so one colluding with the server reads updates)."""
        return self.encryption == "symmetric"

    def scale_for(self, *, value_bound: float, max_clients: int) -> float:
        """The scale for sums of up to ``max_clients`` vectors with entries in [-value_bound, value_bound].

        Raises:
            OverflowRiskError: the sum could wrap around the ciphertext modulus at any scale
                this preset accepts.
        """
        _check_bounds(value_bound, max_clients)
        largest = ckks_largest_scale_bits(
            poly_modulus_degree=self.poly_modulus_degree,
            coeff_mod_bit_sizes=self.coeff_mod_bit_sizes,
            encryption=self.encryption,
            reals_per_slot=self.reals_per_slot,
            value_bound=value_bound,
            max_clients=max_clients,
        )
        q_bits = math.log2(data_modulus(self.poly_modulus_degree, self.coeff_mod_bit_sizes))
        need = self.scale_bits if self.scale_bits is not None else self.min_scale_bits
        if largest < need:
            raise OverflowRiskError(
                f"preset {self.name!r}: max_clients={max_clients} x value_bound={value_bound!r} (x sqrt("
                f"{self.reals_per_slot}) per slot) at scale 2^{need} could exceed half the {q_bits:.1f}-bit "
                f"ciphertext modulus; the largest safe scale is 2^{largest}. Lower max_clients or value_bound, "
                "or use a preset with a larger modulus"
            )
        bits = self.scale_bits if self.scale_bits is not None else largest
        return float(2.0**bits)

    def release_grid(self, *, scale: float, value_bound: float, max_clients: int) -> float:
        """The grid inputs are rounded to and sums are released on (:func:`secagg._he_core.ckks_release_grid`)."""
        return ckks_release_grid(
            poly_modulus_degree=self.poly_modulus_degree,
            encryption=self.encryption,
            reals_per_slot=self.reals_per_slot,
            scale=scale,
            value_bound=value_bound,
            max_clients=max_clients,
        )

    def max_abs_error(self, *, scale: float, num_clients: int, value_bound: float, max_clients: int) -> float:
        """Stated precision: bound on |released sum - exact sum| per coordinate.

        The release is the exact sum of the inputs rounded to the grid, so the bound is each
        client's rounding. It holds in the worst case for symmetric presets; for public-key presets
        as long as the noise stays within the high-probability bound of Cheon, Kim, Kim and Song
        (2017), Lemma 1 (otherwise the key holder refuses to release).
        """
        grid = self.release_grid(scale=scale, value_bound=value_bound, max_clients=max_clients)
        return num_clients * (ckks_rounding_error(grid=grid, value_bound=value_bound) + value_bound * 2.0**-40)


CKKS_PRESETS: Mapping[str, CKKSPreset] = MappingProxyType(
    {
        "compact": CKKSPreset(
            name="compact",
            poly_modulus_degree=4096,
            coeff_mod_bit_sizes=(50,),
            reals_per_slot=2,
            encryption="symmetric",
            engine="sealapi",
            scale_bits=None,
            min_scale_bits=20,
            summary="CKKS N=4096, one 50-bit prime, 2 reals per slot, seeded symmetric ciphertexts",
        ),
        "compact-pk": CKKSPreset(
            name="compact-pk",
            poly_modulus_degree=4096,
            coeff_mod_bit_sizes=(50,),
            reals_per_slot=2,
            encryption="public-key",
            engine="sealapi",
            scale_bits=None,
            min_scale_bits=20,
            summary="CKKS N=4096, one 50-bit prime, 2 reals per slot, public-key encryption",
        ),
        "compat": CKKSPreset(
            name="compat",
            poly_modulus_degree=8192,
            coeff_mod_bit_sizes=(60, 40, 40),
            reals_per_slot=1,
            encryption="public-key",
            engine="tenseal",
            scale_bits=40,
            min_scale_bits=40,
            summary="CKKS N=8192, [60,40,40], scale 2^40, tenseal.ckks_vector (NVIDIA FLARE defaults)",
        ),
    }
)


def ckks_preset(name: str | CKKSPreset) -> CKKSPreset:
    """Look up a preset by name (a :class:`CKKSPreset` passes through).

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    if isinstance(name, CKKSPreset):
        return name
    if not isinstance(name, str) or name not in CKKS_PRESETS:
        raise ValueError(f"preset must be one of {sorted(CKKS_PRESETS)}, got {name!r}")
    return CKKS_PRESETS[name]


def _check_bounds(value_bound: float, max_clients: int) -> None:
    if isinstance(value_bound, bool) or not isinstance(value_bound, (int, float)):
        raise TypeError(f"value_bound must be a number, got {value_bound!r}")
    if not (math.isfinite(value_bound) and value_bound > 0):
        raise ValueError(f"value_bound must be finite and > 0, got {value_bound!r}")
    if isinstance(max_clients, bool) or not isinstance(max_clients, int):
        raise TypeError(f"max_clients must be an int, got {max_clients!r}")
    if max_clients < 1:
        raise ValueError(f"max_clients must be >= 1, got {max_clients!r}")


def _info_fields(preset: CKKSPreset, *, value_bound: float, max_clients: int) -> KeyFields:
    return {
        "scheme": "ckks",
        "preset": preset.name,
        "engine": preset.engine,
        "encryption": preset.encryption,
        "poly_modulus_degree": preset.poly_modulus_degree,
        "coeff_mod_bit_sizes": preset.coeff_mod_bit_sizes,
        "plain_modulus_bits": None,
        "reals_per_slot": preset.reals_per_slot,
        "values_per_ciphertext": preset.values_per_ciphertext,
        "scale": preset.scale_for(value_bound=value_bound, max_clients=max_clients),
        "value_bound": float(value_bound),
        "max_clients": max_clients,
    }


class CKKSKeyHolder(KeyHolderBase):
    """Creates a CKKS key set (a named client or a separate key service) and decrypts aggregates.

    Sends :meth:`public_context` to the server and :meth:`client_context` to clients; the secret
    key leaves it only through ``client_context(include_secret_key=True)``. Decrypts only the
    aggregate it is handed; it cannot tell an aggregate from a single client's ciphertext
    relabelled by a malicious server, which is why collusion with the server breaks privacy.

    Raises:
        ValueError / TypeError: a bad preset, value_bound or max_clients.
        OverflowRiskError: no safe scale for these bounds in this preset.
    """

    def __init__(
        self, preset: str | CKKSPreset = "compact", *, value_bound: float, max_clients: int, name: str = "key-service"
    ) -> None:
        self.preset = ckks_preset(preset)
        super().__init__(_info_fields(self.preset, value_bound=value_bound, max_clients=max_clients), name=name)


class CKKSClient(ClientBase):
    """A client: encrypts its (clipped, weighted) vector into bytes for the server.

    Raises (constructor):
        ProtocolError: tampered or truncated context bytes.
        KeyMaterialError: a context it cannot encrypt with, or not a CKKS one.
    """

    def __init__(self, client_context: bytes, *, client_id: str) -> None:
        super().__init__(client_context, client_id=client_id, scheme="ckks")

    def encrypt(self, update: np.ndarray, *, weight: float = 1.0, round_index: int | None = None) -> bytes:
        """Encrypt ``update`` (already multiplied by ``weight``); ``weight`` travels in the clear.

        ``round_index`` binds the message to one round (a server made for that round refuses others).

        Raises:
            ValueError: NaN/Inf, a coordinate beyond value_bound, an empty or non-1-D vector, or
                a weight that is not a finite positive number.
        """
        length = self._check_vector(update)
        on_grid = snap_to_grid(update, grid=self._info.grid, value_bound=self._info.value_bound)
        plain = self._padded(on_grid, np.float64)
        return self._seal(plain, length=length, weight=weight, round_index=round_index)


class CKKSSum:
    """CKKS-encrypted secure sum (implements :class:`SecureSum`), as three parties' halves.

    Each round a key holder creates fresh keys: a separate key service (``key_holder=None``) or
    the named client's party. Clients encrypt inputs rounded to :attr:`release_grid`, the server
    adds under the public context, the key holder (or, in symmetric presets, one surviving
    client, all of whom hold the key) decrypts and releases the sum on the grid. The halves are
    :meth:`key_holder_session`, :meth:`client_session` and :meth:`server_session` (see
    :mod:`secagg._he_core`); :meth:`aggregate` runs all three in this process.

    Raises (constructor):
        ValueError / TypeError: a bad preset, value_bound, max_clients or key_holder.
        OverflowRiskError: no safe scale for ``max_clients`` x ``value_bound`` in this preset.
    """

    mode = "ckks"

    def __init__(
        self,
        *,
        value_bound: float,
        max_clients: int,
        preset: str | CKKSPreset = "compact",
        key_holder: str | None = None,
    ) -> None:
        self.preset = ckks_preset(preset)
        _check_bounds(value_bound, max_clients)
        if key_holder is not None and (not isinstance(key_holder, str) or not key_holder):
            raise TypeError(f"key_holder must be None (a separate key service) or a client id str, got {key_holder!r}")
        self.value_bound = float(value_bound)
        self.max_clients = max_clients
        self.key_holder = key_holder
        self.scale = self.preset.scale_for(value_bound=value_bound, max_clients=max_clients)
        self.release_grid = self.preset.release_grid(scale=self.scale, value_bound=self.value_bound, max_clients=max_clients)
        self.trust_model = _trust_model(self.preset, key_holder)

    def key_holder_session(self, *, round_index: int) -> KeyHolderSession:
        """The key holder party of one round: fresh keys, contexts for server and clients, one decryption.

        Runs in the key holder's party (a key service, or the named ``key_holder`` client's party).
        """
        name = self.key_holder if self.key_holder is not None else "key-service"
        holder = CKKSKeyHolder(self.preset, value_bound=self.value_bound, max_clients=self.max_clients, name=name)
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
        """A client's half: encrypts under ``keys.he_context`` (``rng`` is unused: SEAL's CSPRNG encrypts).

        Raises:
            KeyMaterialError: no HE context in ``keys``, or one this client cannot encrypt with.
        """
        client = CKKSClient(he_context(keys, client_id), client_id=client_id)
        return HEClientSession(
            client,
            round_index=round_index,
            participants=participants,
            encrypt=lambda vec: client.encrypt(vec, round_index=round_index),
        )

    def server_session(
        self, *, round_index: int, participants: Sequence[str], length: int, public_context: bytes | None = None
    ) -> HEServerSession:
        """The server's half; ``public_context`` is the key holder's ``server_context()``.

        Raises:
            KeyMaterialError: a context that holds a secret key (or none at all).
        """
        if public_context is None:
            raise KeyMaterialError("a CKKS server session needs the key holder's server_context() bytes, got None")
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
        """Run one encrypted round in process through the parties' sessions and :func:`secagg.drive_round`.

        ``rng`` is split among the client sessions (CKKS does not use it: SEAL's CSPRNG encrypts).

        Raises:
            ValueError / TypeError: bad updates or dropouts (naming the client).
            OverflowRiskError: more clients than ``max_clients``.
            DropoutError: the key holder is gone and no one else can decrypt.
        """
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

    def max_abs_error(self, num_clients: int) -> float:
        """The stated precision for a sum of ``num_clients`` contributions."""
        return self.preset.max_abs_error(
            scale=self.scale, num_clients=num_clients, value_bound=self.value_bound, max_clients=self.max_clients
        )

    def describe(self) -> dict[str, object]:
        """Preset, parameters, stated error and bytes per parameter, for reports."""
        return {
            "mode": self.mode,
            "preset": self.preset.name,
            "summary": self.preset.summary,
            "engine": "tenseal.ckks_vector" if self.preset.engine == "tenseal" else "tenseal.sealapi (SEAL)",
            "encryption": self.preset.encryption + (" (seeded)" if self.preset.encryption == "symmetric" else ""),
            "poly_modulus_degree": self.preset.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.preset.coeff_mod_bit_sizes),
            "modulus_bits": self.preset.modulus_bits,
            "scale": self.scale,
            "scale_bits": int(math.log2(self.scale)),
            "slots": self.preset.slots,
            "reals_per_slot": self.preset.reals_per_slot,
            "values_per_ciphertext": self.preset.values_per_ciphertext,
            "security_bits": self.preset.security_bits,
            "value_bound": self.value_bound,
            "max_clients": self.max_clients,
            "release_grid": self.release_grid,
            "release": "exact sum of the inputs rounded to release_grid; the raw decryption never leaves the key holder",
            "max_abs_error_at_max_clients": self.max_abs_error(self.max_clients),
            "precision_bound": (
                "worst case" if self.preset.encryption == "symmetric" else "high probability (CKKS 2017, Lemma 1)"
            ),
            "key_holder": self.key_holder if self.key_holder is not None else "separate key service",
            "clients_hold_secret_key": self.preset.clients_hold_secret_key,
        }


def _trust_model(preset: CKKSPreset, key_holder: str | None) -> str:
    """Who sees what in this preset, as the code enforces it (each sentence has a test)."""
    holder = f"client {key_holder!r}'s party" if key_holder is not None else "a separate key service"
    common = (
        f"Homomorphic encryption (CKKS, preset {preset.name!r}, 128-bit security; honest-but-curious server): "
        f"each round {holder} makes fresh keys. The server holds only the public context (parameters, and the "
        "public key where used) and refuses any context holding the secret key; it sees each client's "
        "ciphertext with its id, vector length and declared weight, adds them, and learns the released sum. "
        "The key holder decrypts one aggregate per key set and releases only the exact sum of the clients' "
        "inputs rounded to a public grid (spacing above four times the noise bound), never the raw decryption, "
        "so the released sum carries nothing about the key or the encryption noise (the Li-Micciancio key "
        "recovery from a raw CKKS decryption yields nothing). "
    )
    if preset.clients_hold_secret_key:
        who = (
            "Every client holds the secret key in this preset (it encrypts with it), so any client, or the "
            "key holder, colluding with the server can decrypt any individual update; if the key holder is "
            "silent, the server asks one contributor at a time to decrypt instead. "
        )
    else:
        who = (
            "Clients hold only the public key, so a client colluding with the server decrypts nothing; the key "
            "holder colluding with the server can decrypt any individual update. The exactness of the "
            "release rests on the high-probability noise bound of CKKS 2017 (Lemma 1); a decryption off the "
            "grid, such as one caused by a colluding client's unrounded input, is refused, which tells the "
            "server one bit (refused or not). "
        )
    return (
        common
        + who
        + (
            "Message digests detect corruption, not an active attacker: a malicious server can alter the "
            "aggregate undetected, or pass one client's ciphertext off as the aggregate, and the key holder "
            "cannot tell. The released sum is within the stated max_abs_error of the exact sum (the rounding)."
        )
    )
