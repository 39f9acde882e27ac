"""Roles of homomorphic aggregation (key holder, client, server), their round sessions, one in-process round.

Each party of a round builds its own half from the backend (``CKKSSum``, ``BFVSum``)::

    holder = backend.key_holder_session(round_index=r)        # key holder party: makes the keys
    holder.server_context() -> bytes                          # to the server: public only
    holder.client_context(client_id) -> bytes                 # to that client, out of the server's reach
    holder.handle(aggregate: bytes) -> bytes                  # the released sum (CKKS: on the grid), once
    backend.client_session(cid, round_index=r, participants=ids, rng=rng,
                           keys=ClientKeys(he_context=client_context))
    backend.server_session(round_index=r, participants=ids, length=d,
                           public_context=server_context)

The server session's batch 1 (stage MASKED_INPUT) asks each participant for its ciphertext,
batch 2 (stage UNMASK) sends the aggregate to recipient ``secagg.KEY_HOLDER``.

Shared by :mod:`secagg.ckks` and :mod:`secagg.bfv`. Every party exchanges bytes in the format
of :mod:`secagg._he_wire`; every header names the scheme, preset, a fingerprint of the SEAL
parameters and a random key-set id, so that mixed-up parameters or key sets fail with a clear
error before any arithmetic.

Who sees what:
    key holder: creates the keys, sends the public context (no secret key) to the server and a
        client context to each client, decrypts only the aggregate.
    client: encrypts its own (clipped, weighted) vector; holds the secret key only in symmetric
        presets, where it encrypts with it.
    server: holds the public context, sees ciphertexts and public metadata (client ids, vector
        length, weights), adds ciphertexts; refuses any context holding a secret key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Container, Mapping, Protocol, Sequence, TypedDict

import numpy as np

from . import _he_wire as wire
from ._he_seal import (
    SEAL_ERRORS,
    SealEngine,
    SealSpec,
    coeff_modulus_values,
    new_key_id,
    spec_fingerprint,
)
from ._he_tenseal import TensealEngine, is_private_tenseal_context
from .base import Stage, SumResult, check_updates
from .errors import DropoutError, KeyMaterialError, OverflowRiskError, ProtocolError
from .session import KEY_HOLDER, ClientKeys, drive_round

__all__ = [
    "ContextInfo",
    "DecryptedSum",
    "HEEngine",
    "HEServer",
    "KeyFields",
    "KeyHolderBase",
    "ClientBase",
    "ckks_error_bound",
    "ckks_release_grid",
    "ckks_rounding_error",
    "snap_to_grid",
    "ckks_fresh_noise_coeff_bound",
    "ckks_largest_scale_bits",
    "data_modulus",
    "HEClientSession",
    "HEServerSession",
    "KeyHolderSession",
    "decryption_message",
    "read_decryption",
    "run_session_round",
    "he_context",
]

# SEAL samples fresh noise from a centred binomial distribution on [-21, 21] (sigma ~ 3.24), or,
# when built with SEAL_USE_GAUSSIAN_NOISE, a normal clipped at 6 sigma = 19.2: 21 bounds both.
NOISE_MAX = 21.0
NOISE_SIGMA = 3.2


# ---------------------------------------------------------------------------------------------
# numbers: moduli, noise, scale
# ---------------------------------------------------------------------------------------------
def data_modulus(poly_modulus_degree: int, coeff_mod_bit_sizes: tuple[int, ...]) -> int:
    """Product of the primes ciphertexts live under (SEAL keeps the last prime as the special
    prime for key switching when there is more than one)."""
    primes = coeff_modulus_values(poly_modulus_degree, tuple(coeff_mod_bit_sizes))
    data = primes[:-1] if len(primes) > 1 else primes
    return math.prod(data)


def ckks_fresh_noise_coeff_bound(poly_modulus_degree: int, encryption: str) -> float:
    """Worst case of one fresh ciphertext's noise per polynomial coefficient (deterministic).

    Symmetric: the error e itself. Public key: e0 + e1*s - e*u with ternary s, u, so at most
    NOISE_MAX * (1 + 2N).
    """
    if encryption == "symmetric":
        return NOISE_MAX
    return NOISE_MAX * (1 + 2 * poly_modulus_degree)


def _ckks_fresh_noise_slot_bound(poly_modulus_degree: int, encryption: str) -> float:
    n = poly_modulus_degree
    if encryption == "symmetric":
        # |e(zeta)| <= sum_j |e_j| <= 21 N: a worst-case bound, not a probabilistic one.
        return NOISE_MAX * n
    # Cheon, Kim, Kim, Song (ASIACRYPT 2017), Lemma 1: B_clean = 8 sqrt(2) sigma N + 6 sigma sqrt(N)
    # + 16 sigma sqrt(h N), with h = N (SEAL's secret is uniform ternary, weight ~ 2N/3). It holds
    # with high probability (the paper's heuristic), not in the worst case.
    return 8 * math.sqrt(2) * NOISE_SIGMA * n + 6 * NOISE_SIGMA * math.sqrt(n) + 16 * NOISE_SIGMA * n


def ckks_error_bound(
    *, poly_modulus_degree: int, encryption: str, reals_per_slot: int, scale: float, value_bound: float, count: int
) -> float:
    """Bound on |decrypted sum - exact sum| per coordinate for ``count`` fresh ciphertexts.

    Per client: the fresh-noise bound above, plus encoding error of at most 0.5 (rounding) plus a
    double-precision FFT allowance per coefficient, each coefficient moving a slot by at most its
    magnitude; divided by the scale. Plus a float64 allowance for decoding.
    """
    if count <= 0:
        return 0.0
    n = poly_modulus_degree
    peak = scale * math.sqrt(reals_per_slot) * value_bound  # largest plaintext coefficient of one client
    encode_err = 0.5 + peak * 2.0**-52 * 2 * math.log2(n)
    per_client = _ckks_fresh_noise_slot_bound(n, encryption) + n * encode_err
    float_slack = count * value_bound * math.sqrt(reals_per_slot) * 2.0**-40
    return count * per_client / scale + float_slack


def ckks_release_grid(
    *, poly_modulus_degree: int, encryption: str, reals_per_slot: int, scale: float, value_bound: float, max_clients: int
) -> float:
    """Spacing of the grid that clients round their CKKS inputs to, and that the key holder releases.

    The smallest power of two above 4 x the decryption's noise radius (:func:`ckks_error_bound`) at
    ``max_clients``. A sum of inputs on the grid decrypts to within that radius of a grid point,
    so rounding to the grid recovers the exact sum of the rounded inputs: the release is a function
    of the inputs alone, and the encryption noise, which Li and Micciancio (EUROCRYPT 2021) solve
    for the key with, never leaves the key holder. Spacing above 4 x the radius also means that an
    off-grid input (a client colluding with the server) can only make the key holder refuse: two
    accepted outcomes are farther apart than any noise can move a decryption.
    """
    radius = ckks_error_bound(
        poly_modulus_degree=poly_modulus_degree,
        encryption=encryption,
        reals_per_slot=reals_per_slot,
        scale=scale,
        value_bound=value_bound,
        count=max_clients,
    )
    return 2.0 ** (math.floor(math.log2(4 * radius)) + 1)


def snap_to_grid(values: np.ndarray, *, grid: float, value_bound: float) -> np.ndarray:
    """``values`` rounded to the nearest multiple of ``grid`` within [-value_bound, value_bound]."""
    steps = math.floor(value_bound / grid)
    return np.clip(np.round(np.asarray(values, dtype=np.float64) / grid), -steps, steps) * grid


def ckks_rounding_error(*, grid: float, value_bound: float) -> float:
    """Largest |snap_to_grid(x) - x| over x in [-value_bound, value_bound] (one client's error)."""
    return max(grid / 2, value_bound - grid * math.floor(value_bound / grid))


def ckks_largest_scale_bits(
    *,
    poly_modulus_degree: int,
    coeff_mod_bit_sizes: tuple[int, ...],
    encryption: str,
    reals_per_slot: int,
    value_bound: float,
    max_clients: int,
) -> int:
    """Largest k such that the sum of ``max_clients`` encodings at scale 2^k cannot wrap mod q.

    Each coefficient of one client's plaintext is at most scale * sqrt(reals_per_slot) *
    value_bound (the inverse canonical embedding does not exceed the largest slot modulus), plus
    its fresh noise and 1 for rounding; the sum of ``max_clients`` must stay below q/2.
    """
    q = data_modulus(poly_modulus_degree, coeff_mod_bit_sizes)
    half_q = q / 2 * (1 - 2.0**-20)
    per_client_room = half_q / max_clients - ckks_fresh_noise_coeff_bound(poly_modulus_degree, encryption) - 1
    if per_client_room <= 0:
        return -1
    bits = math.floor(math.log2(per_client_room / (math.sqrt(reals_per_slot) * value_bound)))
    # SEAL also wants the scale's bit count below the modulus' (small value_bound): cap it
    return min(bits, q.bit_length() - 2)


# ---------------------------------------------------------------------------------------------
# context headers
# ---------------------------------------------------------------------------------------------
class _RequiredKeyFields(TypedDict):
    scheme: str
    preset: str
    engine: str
    encryption: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    plain_modulus_bits: int | None
    reals_per_slot: int
    values_per_ciphertext: int
    scale: float
    value_bound: float
    max_clients: int


class KeyFields(_RequiredKeyFields, total=False):
    """What a scheme tells :class:`KeyHolderBase` about its preset: :class:`ContextInfo` less the
    fields of one key set (fingerprint, key_id, holder)."""

    quant_bits: int
    step: float
    levels: int


@dataclass(frozen=True)
class ContextInfo:
    """The public facts of a key set, as carried in every context header."""

    scheme: str
    preset: str
    engine: str
    encryption: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    plain_modulus_bits: int | None
    reals_per_slot: int
    values_per_ciphertext: int
    fingerprint: str
    key_id: str
    holder: str
    scale: float
    value_bound: float
    max_clients: int
    quant_bits: int | None = None
    step: float | None = None
    levels: int | None = None

    def header(self, *, has_secret_key: bool, blobs: list[str]) -> dict[str, object]:
        head = {name: getattr(self, name) for name in self.__dataclass_fields__}
        head["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        head["has_secret_key"] = has_secret_key
        head["blobs"] = blobs
        return head

    def link(self) -> dict[str, object]:
        """The fields a ciphertext or aggregate repeats to bind itself to this key set."""
        return {
            "scheme": self.scheme,
            "preset": self.preset,
            "fingerprint": self.fingerprint,
            "scale": self.scale,
            "key_id": self.key_id,
        }

    def spec(self) -> SealSpec:
        return SealSpec(
            scheme=self.scheme,
            poly_modulus_degree=self.poly_modulus_degree,
            coeff_mod_bit_sizes=self.coeff_mod_bit_sizes,
            plain_modulus_bits=self.plain_modulus_bits,
            reals_per_slot=self.reals_per_slot,
            encryption=self.encryption,
        )

    @property
    def grid(self) -> float:
        """CKKS: the release grid (:func:`ckks_release_grid`), fixed by the public parameters."""
        return ckks_release_grid(
            poly_modulus_degree=self.poly_modulus_degree,
            encryption=self.encryption,
            reals_per_slot=self.reals_per_slot,
            scale=self.scale,
            value_bound=self.value_bound,
            max_clients=self.max_clients,
        )

    def noise_radius(self, count: int) -> float:
        """CKKS: bound on |decryption - sum of the grid inputs| for ``count`` contributions (worst
        case for symmetric presets, high probability for public-key ones)."""
        return ckks_error_bound(
            poly_modulus_degree=self.poly_modulus_degree,
            encryption=self.encryption,
            reals_per_slot=self.reals_per_slot,
            scale=self.scale,
            value_bound=self.value_bound,
            count=count,
        )

    def error_bound(self, count: int) -> float:
        """The stated precision of a released sum of ``count`` contributions.

        BFV: stochastic rounding moves each client's coordinate by less than one step. CKKS: the
        release is the exact sum of the inputs rounded to the grid, so each client's rounding.
        """
        if count <= 0:
            return 0.0
        if self.scheme == "bfv":
            step, _levels = self.quantization()
            return count * step * (1 + 1e-9)
        per_client = ckks_rounding_error(grid=self.grid, value_bound=self.value_bound)
        return count * (per_client + self.value_bound * 2.0**-40)

    def quantization(self) -> tuple[float, int]:
        """BFV: (step, levels), which every BFV key set carries (:meth:`parse` checks it)."""
        if self.step is None or self.levels is None:
            raise ProtocolError(f"{self.scheme} key set of preset {self.preset!r} carries no quantization step/levels")
        return self.step, self.levels

    @classmethod
    def parse(cls, header: Mapping[str, object], *, what: str) -> "ContextInfo":
        """Read and type-check a context header; ProtocolError if malformed."""

        def get(name, kinds, *, optional=False):
            value = header.get(name)
            if value is None and optional:
                return None
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ProtocolError(f"{what}: header field {name!r} is missing or malformed ({value!r})")
            return value

        bits = get("coeff_mod_bit_sizes", list)
        if not bits or not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 61 for b in bits):
            raise ProtocolError(f"{what}: header field 'coeff_mod_bit_sizes' is malformed ({bits!r})")
        info = cls(
            scheme=get("scheme", str),
            preset=get("preset", str),
            engine=get("engine", str),
            encryption=get("encryption", str),
            poly_modulus_degree=get("poly_modulus_degree", int),
            coeff_mod_bit_sizes=tuple(bits),
            plain_modulus_bits=get("plain_modulus_bits", int, optional=True),
            reals_per_slot=get("reals_per_slot", int),
            values_per_ciphertext=get("values_per_ciphertext", int),
            fingerprint=get("fingerprint", str),
            key_id=get("key_id", str),
            holder=get("holder", str),
            scale=float(get("scale", (int, float))),
            value_bound=float(get("value_bound", (int, float))),
            max_clients=get("max_clients", int),
            quant_bits=get("quant_bits", int, optional=True),
            step=get("step", (int, float), optional=True),
            levels=get("levels", int, optional=True),
        )
        if info.scheme not in ("ckks", "bfv") or info.engine not in ("sealapi", "tenseal"):
            raise ProtocolError(f"{what}: unknown scheme/engine {info.scheme!r}/{info.engine!r}")
        if info.encryption not in ("symmetric", "public-key"):
            raise ProtocolError(f"{what}: unknown encryption {info.encryption!r}")
        if info.poly_modulus_degree not in (1024, 2048, 4096, 8192, 16384, 32768):
            raise ProtocolError(f"{what}: poly_modulus_degree {info.poly_modulus_degree} is not a supported power of two")
        if info.scheme == "bfv" and (info.plain_modulus_bits is None or info.step is None or info.levels is None):
            raise ProtocolError(f"{what}: a BFV header needs plain_modulus_bits, step and levels")
        for name in ("scale", "value_bound"):
            value = getattr(info, name)
            if not (math.isfinite(value) and value > 0):
                raise ProtocolError(f"{what}: header field {name!r} must be finite and > 0, got {value!r}")
        if info.max_clients < 1:
            raise ProtocolError(f"{what}: header field 'max_clients' must be >= 1, got {info.max_clients}")
        try:
            expected = spec_fingerprint(info.spec())
        except SEAL_ERRORS as exc:
            raise ProtocolError(f"{what}: SEAL cannot build these parameters ({exc})") from None
        if info.fingerprint != expected:
            raise KeyMaterialError(
                f"{what}: the parameter fingerprint {info.fingerprint} does not match its own parameters "
                f"(N={info.poly_modulus_degree}, bits={list(info.coeff_mod_bit_sizes)}: {expected})"
            )
        return info


class HEEngine(Protocol):
    """What the roles use of an engine (:class:`SealEngine`, :class:`TensealEngine`)."""

    @property
    def holds_secret_key(self) -> bool: ...

    @property
    def can_encrypt(self) -> bool: ...

    def export(self, *, secret_key: bool, public_key: bool) -> dict[str, bytes]: ...

    def encrypt(self, plain: np.ndarray) -> list[bytes]: ...

    def accumulate(self, acc: list | None, blobs: Sequence[bytes], *, what: str) -> list: ...

    def dump(self, acc: Sequence) -> list[bytes]: ...

    def decrypt(self, blobs: Sequence[bytes], *, what: str) -> np.ndarray: ...


def build_engine(info: ContextInfo, envelope: wire.Envelope, *, what: str) -> HEEngine:
    """The engine for a parsed context: SEAL via sealapi, or TenSEAL for the compatibility preset."""
    names = envelope.header.get("blobs")
    if (
        not isinstance(names, list)
        or not all(isinstance(n, str) for n in names)
        or len(set(names)) != len(names)
        or len(names) != len(envelope.blobs)
    ):
        raise ProtocolError(f"{what}: the header's blob names must be {len(envelope.blobs)} distinct strings, got {names!r:.80}")
    blobs = dict(zip(names, envelope.blobs))
    if info.engine == "tenseal":
        return TensealEngine.from_blobs(
            poly_modulus_degree=info.poly_modulus_degree,
            coeff_mod_bit_sizes=info.coeff_mod_bit_sizes,
            scale=info.scale,
            blobs=blobs,
            what=what,
        )
    return SealEngine.from_blobs(info.spec(), blobs, scale=info.scale, what=what)


def generate_engine(info_fields: KeyFields) -> HEEngine:
    """Fresh keys for the preset described by ``info_fields`` (a key holder's job)."""
    if info_fields["engine"] == "tenseal":
        return TensealEngine.generate(
            poly_modulus_degree=info_fields["poly_modulus_degree"],
            coeff_mod_bit_sizes=tuple(info_fields["coeff_mod_bit_sizes"]),
            scale=info_fields["scale"],
        )
    spec = SealSpec(
        scheme=info_fields["scheme"],
        poly_modulus_degree=info_fields["poly_modulus_degree"],
        coeff_mod_bit_sizes=tuple(info_fields["coeff_mod_bit_sizes"]),
        plain_modulus_bits=info_fields.get("plain_modulus_bits"),
        reals_per_slot=info_fields["reals_per_slot"],
        encryption=info_fields["encryption"],
    )
    return SealEngine.generate(spec, scale=info_fields["scale"] if info_fields["scheme"] == "ckks" else None)


def _check_link(info: ContextInfo, header: Mapping[str, object], *, what: str) -> None:
    """A message must be made under this context's parameters and key set."""
    for name in ("scheme", "preset", "fingerprint", "scale"):
        if header.get(name) != getattr(info, name):
            raise KeyMaterialError(
                f"{what} was made under {name}={header.get(name)!r}, but this context has "
                f"{name}={getattr(info, name)!r}: client and server contexts have mismatched parameters"
            )
    if header.get("key_id") != info.key_id:
        raise ProtocolError(
            f"{what} was encrypted under key set {header.get('key_id')!r}, this context holds key set "
            f"{info.key_id!r} (a stale or foreign ciphertext)"
        )


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecryptedSum:
    """The decrypted aggregate, with the public facts the server recorded.

    Attributes:
        total: float64 sum of the contributors' (already weighted) vectors.
        count: number of contributions summed.
        weight_sum: public sum of the weights the contributors declared.
        contributors: their ids, in the order the server added them.
        max_abs_error: stated bound on ``|total - exact sum|`` per coordinate.
        integer_total: BFV only: the exact sum of the quantized integers.
    """

    total: np.ndarray
    count: int
    weight_sum: float
    contributors: tuple[str, ...]
    max_abs_error: float
    integer_total: np.ndarray | None = field(default=None)

    def weighted_mean(self) -> np.ndarray:
        """``total / weight_sum``: the weighted average, divided only after decryption."""
        if not self.weight_sum > 0:
            raise ValueError(f"weight_sum must be > 0 to average, got {self.weight_sum!r}")
        return self.total / self.weight_sum


# ---------------------------------------------------------------------------------------------
# parties
# ---------------------------------------------------------------------------------------------
class _Decrypting:
    """Decryption shared by key holders and secret-key-holding clients."""

    _info: ContextInfo
    _engine: HEEngine

    @property
    def info(self) -> ContextInfo:
        return self._info

    def _decrypt(self, aggregate: bytes) -> DecryptedSum:
        what = "aggregate"
        env = wire.unpack(aggregate, what=what)
        if env.kind != wire.AGGREGATE:
            raise ProtocolError(f"expected an aggregate ciphertext, got a {env.kind_name}")
        head = env.header
        _check_link(self._info, head, what=what)
        count, length, weight_sum = head.get("count"), head.get("length"), head.get("weight_sum")
        contributors = head.get("contributors")
        if not (
            isinstance(count, int)
            and isinstance(length, int)
            and isinstance(weight_sum, (int, float))
            and isinstance(contributors, list)
            and len(contributors) == count
            and length >= 1
        ):
            raise ProtocolError(f"{what}: malformed count/length/weight_sum/contributors in its header")
        if count < 1 or count > self._info.max_clients:
            raise OverflowRiskError(
                f"{what} sums {count} contributions; this key set was made for 1..max_clients={self._info.max_clients}"
            )
        per = self._info.values_per_ciphertext
        if len(env.blobs) != -(-length // per):
            raise ProtocolError(f"{what}: {len(env.blobs)} ciphertexts cannot hold {length} values ({per} each)")
        raw = self._engine.decrypt(env.blobs, what=what)
        if self._info.scheme == "bfv":
            step, levels = self._info.quantization()
            limit = count * levels
            if np.any(np.abs(raw[:length]) > limit) or np.any(raw[length:] != 0):
                raise ProtocolError(f"{what} decrypts outside the possible range (|sum| <= {limit}): wrong key, or tampered")
            total = raw[:length].astype(np.float64) * step
            integer_total = raw[:length].copy()
        else:
            radius = self._info.noise_radius(count)
            bound = count * self._info.value_bound + radius
            if np.any(np.abs(raw[:length]) > bound) or np.any(np.abs(raw[length:]) > radius):
                raise ProtocolError(f"{what} decrypts outside the possible range (|sum| <= {bound:.6g}): wrong key, or tampered")
            # release only the grid point: a raw decryption gives the server the key (Li-Micciancio 2021)
            grid = self._info.grid
            total = np.round(raw[:length] / grid) * grid
            off = float(np.max(np.abs(raw[:length] - total)))
            if off > radius:
                raise ProtocolError(
                    f"{what} decrypts {off:.3g} away from the release grid (spacing {grid:.3g}), beyond the noise "
                    f"radius {radius:.3g}: an input was not rounded to the grid; nothing is released"
                )
            integer_total = None
        return DecryptedSum(
            total=total,
            count=count,
            weight_sum=float(weight_sum),
            contributors=tuple(contributors),
            max_abs_error=self._info.error_bound(count),
            integer_total=integer_total,
        )


class KeyHolderBase(_Decrypting):
    """Creates a key set; hands out the public and client contexts; decrypts the aggregate."""

    def __init__(self, info_fields: KeyFields, *, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        fields = info_fields.copy()
        self._engine = generate_engine(fields)
        key_id = new_key_id()
        fields["coeff_mod_bit_sizes"] = tuple(fields["coeff_mod_bit_sizes"])
        fingerprint = spec_fingerprint(
            SealSpec(
                scheme=fields["scheme"],
                poly_modulus_degree=fields["poly_modulus_degree"],
                coeff_mod_bit_sizes=fields["coeff_mod_bit_sizes"],
                plain_modulus_bits=fields.get("plain_modulus_bits"),
            )
        )
        self._info = ContextInfo(**fields, fingerprint=fingerprint, key_id=key_id, holder=name)
        self.name = name

    @property
    def key_id(self) -> str:
        return self._info.key_id

    @property
    def scale(self) -> float:
        return self._info.scale

    def public_context(self) -> bytes:
        """Bytes for the server: parameters (and the public key in public-key presets), no secret key."""
        blobs = self._engine.export(secret_key=False, public_key=True)
        return wire.pack(wire.PUBLIC_CONTEXT, self._info.header(has_secret_key=False, blobs=list(blobs)), list(blobs.values()))

    def client_context(self, *, include_secret_key: bool) -> bytes:
        """Bytes for a client. The secret key is serialized only with ``include_secret_key=True``.

        Raises:
            KeyMaterialError: ``include_secret_key=False`` in a symmetric preset, where clients
                encrypt with the secret key and so cannot do without it.
        """
        if not isinstance(include_secret_key, bool):
            raise TypeError(f"include_secret_key must be a bool, got {include_secret_key!r}")
        if not include_secret_key and self._info.encryption == "symmetric":
            raise KeyMaterialError(
                f"preset {self._info.preset!r} encrypts with the secret key (seeded symmetric ciphertexts), "
                "so its clients need it: call client_context(include_secret_key=True), or choose a "
                "public-key preset such as 'compact-pk'"
            )
        blobs = self._engine.export(secret_key=include_secret_key, public_key=True)
        return wire.pack(
            wire.CLIENT_CONTEXT, self._info.header(has_secret_key=include_secret_key, blobs=list(blobs)), list(blobs.values())
        )

    def decrypt(self, aggregate: bytes) -> DecryptedSum:
        """Decrypt the server's aggregate (the only ciphertext a key holder should be handed).

        Raises:
            ProtocolError: tampered or truncated bytes, a foreign key set, or a plaintext outside
                the range the contributions allow (a sign of a wrong key or tampering).
            KeyMaterialError: parameters that differ from this key set's.
        """
        return self._decrypt(aggregate)

    def describe(self) -> dict[str, object]:
        return describe_info(self._info)


class ClientBase(_Decrypting):
    """Encrypts one client's vectors under a client (or, in public-key presets, public) context."""

    def __init__(self, client_context: bytes, *, client_id: str, scheme: str) -> None:
        if not isinstance(client_id, str) or not client_id:
            raise TypeError(f"client_id must be a non-empty str, got {client_id!r}")
        what = f"context of client {client_id!r}"
        env = wire.unpack(client_context, what=what)
        if env.kind not in (wire.CLIENT_CONTEXT, wire.PUBLIC_CONTEXT):
            raise KeyMaterialError(f"{what}: expected a client or public context, got a {env.kind_name}")
        info = ContextInfo.parse(env.header, what=what)
        if info.scheme != scheme:
            raise KeyMaterialError(f"{what}: this is a {info.scheme} context, this client speaks {scheme}")
        self._engine = build_engine(info, env, what=what)
        if not self._engine.can_encrypt:
            raise KeyMaterialError(
                f"{what}: preset {info.preset!r} encrypts with the secret key, which this context lacks; "
                "ask the key holder for client_context(include_secret_key=True)"
            )
        self._info = info
        self.client_id = client_id

    @property
    def holds_secret_key(self) -> bool:
        return self._engine.holds_secret_key

    def _seal(self, plain: np.ndarray, *, length: int, weight: float, round_index: int | None) -> bytes:
        number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not (number and math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
        if round_index is not None:
            _check_round_index(round_index)
        blobs = self._engine.encrypt(plain)
        head = self._info.link() | {
            "client": self.client_id,
            "length": length,
            "weight": float(weight),
            "blobs": [str(i) for i in range(len(blobs))],
        }
        if round_index is not None:
            head["round"] = round_index
        return wire.pack(wire.CIPHERTEXT, head, blobs)

    def _check_vector(self, update: np.ndarray) -> int:
        check_updates({self.client_id: update}, value_bound=self._info.value_bound)
        return update.size

    def _padded(self, values: np.ndarray, dtype) -> np.ndarray:
        per = self._info.values_per_ciphertext
        out = np.zeros(-(-values.size // per) * per, dtype=dtype)
        out[: values.size] = values
        return out

    def decrypt(self, aggregate: bytes) -> DecryptedSum:
        """Decrypt the aggregate; only where this client holds the secret key.

        Raises:
            KeyMaterialError: this client holds only a public key.
        """
        if not self.holds_secret_key:
            raise KeyMaterialError(f"client {self.client_id!r} holds no secret key; the key holder decrypts")
        return self._decrypt(aggregate)


class HEServer:
    """Adds clients' ciphertexts under a public context; never holds a secret key.

    What it sees: the public context, each client's ciphertext bytes, and public metadata (client
    id, vector length, declared weight). It keeps the public sum of weights so that averaging
    (division) happens after decryption.

    Raises (constructor):
        KeyMaterialError: a context that holds a secret key (a client context with the key, a
            private TenSEAL context, a key holder object), or not a public context at all.
    """

    def __init__(self, public_context: bytes, *, round_index: int | None = None) -> None:
        if round_index is not None:
            _check_round_index(round_index)
        if isinstance(public_context, (KeyHolderBase, ClientBase)) or is_private_tenseal_context(public_context):
            raise KeyMaterialError(
                "the server refuses a context that holds a secret key (a key holder, a client object, a "
                "private TenSEAL context); pass the bytes of key_holder.public_context()"
            )
        what = "server context"
        env = wire.unpack(public_context, what=what)
        names = env.header.get("blobs", [])
        if env.header.get("has_secret_key") is not False or (isinstance(names, Container) and "secret_key" in names):
            raise KeyMaterialError(
                f"{what} holds a secret key ({env.kind_name}); the server accepts only the public context "
                "from key_holder.public_context()"
            )
        if env.kind != wire.PUBLIC_CONTEXT:
            raise KeyMaterialError(f"{what}: expected a public context, got a {env.kind_name}")
        info = ContextInfo.parse(env.header, what=what)
        engine = build_engine(info, env, what=what)
        if engine.holds_secret_key:
            raise KeyMaterialError(f"{what} holds a secret key inside its {info.engine} context; refused")
        self._info = info
        self._engine = engine
        self._round = round_index
        self._acc: list | None = None
        self._contributors: list[str] = []
        self._weight_sum = 0.0
        self._length: int | None = None

    @property
    def info(self) -> ContextInfo:
        """The public parameters of the context the server adds under."""
        return self._info

    @property
    def contributors(self) -> tuple[str, ...]:
        """Clients whose ciphertexts are in the aggregate, in the order they arrived."""
        return tuple(self._contributors)

    @property
    def weight_sum(self) -> float:
        """The sum of the contributors' declared weights (plaintext metadata, not encrypted)."""
        return self._weight_sum

    def add(self, client_id: str, message: bytes) -> None:
        """Check one client's ciphertext message and add it to the running sum.

        Raises:
            ProtocolError: tampered/truncated bytes, a message of another client, key set or
                round, a duplicate, or a vector length different from the others'.
            KeyMaterialError: a ciphertext made under other parameters than this context's.
            OverflowRiskError: more contributions than the ``max_clients`` the scale allows.
        """
        if not isinstance(client_id, str):
            raise TypeError(f"client_id must be a str, got {client_id!r}")
        what = f"ciphertext of client {client_id!r}"
        env = wire.unpack(message, what=what)
        if env.kind != wire.CIPHERTEXT:
            raise ProtocolError(f"{what}: expected a client ciphertext, got a {env.kind_name}")
        head = env.header
        _check_link(self._info, head, what=what)
        if head.get("client") != client_id:
            raise ProtocolError(f"{what} names client {head.get('client')!r} inside: swapped or replayed")
        if head.get("round") != self._round:
            raise ProtocolError(f"{what} is for round {head.get('round')!r}, this aggregate is for round {self._round!r}")
        if client_id in self._contributors:
            raise ProtocolError(f"{what}: client {client_id!r} already contributed to this aggregate")
        if len(self._contributors) >= self._info.max_clients:
            raise OverflowRiskError(
                f"{what}: this would be contribution {len(self._contributors) + 1}, but the scale was chosen "
                f"for at most max_clients={self._info.max_clients}; the sum could overflow"
            )
        length, weight = head.get("length"), head.get("weight")
        if not (isinstance(length, int) and not isinstance(length, bool) and length >= 1):
            raise ProtocolError(f"{what}: malformed length {length!r}")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise ProtocolError(f"{what}: malformed weight {weight!r}")
        if self._length is not None and length != self._length:
            raise ProtocolError(f"{what} has length {length}, the others have {self._length}")
        per = self._info.values_per_ciphertext
        if len(env.blobs) != -(-length // per):
            raise ProtocolError(f"{what}: {len(env.blobs)} ciphertexts cannot hold {length} values ({per} each)")
        self._acc = self._engine.accumulate(self._acc, env.blobs, what=what)
        self._length = length
        self._contributors.append(client_id)
        self._weight_sum += float(weight)

    def result(self) -> bytes:
        """The aggregate ciphertext message for the key holder(s).

        Raises:
            DropoutError: no contribution was added.
        """
        if self._acc is None:
            raise DropoutError("no client ciphertext was added; there is no aggregate to decrypt")
        blobs = self._engine.dump(self._acc)
        head = self._info.link() | {
            "length": self._length,
            "count": len(self._contributors),
            "weight_sum": self._weight_sum,
            "contributors": list(self._contributors),
            "blobs": [str(i) for i in range(len(blobs))],
        }
        if self._round is not None:
            head["round"] = self._round
        return wire.pack(wire.AGGREGATE, head, blobs)

    def describe(self) -> dict[str, object]:
        """Parameters and sizes of the aggregate so far, for reports."""
        return describe_info(self._info)


def describe_info(info: ContextInfo) -> dict[str, object]:
    """The public description of a key set's parameters (for reports)."""
    desc: dict[str, object] = {
        "scheme": info.scheme,
        "preset": info.preset,
        "engine": "tenseal.ckks_vector" if info.engine == "tenseal" else "tenseal.sealapi (SEAL)",
        "encryption": info.encryption + (" (seeded)" if info.encryption == "symmetric" else ""),
        "poly_modulus_degree": info.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(info.coeff_mod_bit_sizes),
        "modulus_bits": sum(info.coeff_mod_bit_sizes),
        "security_bits": 128,
        "values_per_ciphertext": info.values_per_ciphertext,
        "value_bound": info.value_bound,
        "max_clients": info.max_clients,
        "key_holder": info.holder,
    }
    if info.scheme == "ckks":
        desc.update(
            slots=info.poly_modulus_degree // 2,
            reals_per_slot=info.reals_per_slot,
            scale=info.scale,
            scale_bits=math.log2(info.scale),
            release_grid=info.grid,
            max_abs_error_at_max_clients=info.error_bound(info.max_clients),
        )
    else:
        desc.update(
            slots=info.poly_modulus_degree,
            plain_modulus_bits=info.plain_modulus_bits,
            quant_bits=info.quant_bits,
            step=info.step,
            levels=info.levels,
            max_abs_error_at_max_clients=info.error_bound(info.max_clients),
        )
    return desc


# ---------------------------------------------------------------------------------------------
# the decrypted sum on the wire
# ---------------------------------------------------------------------------------------------
def decryption_message(info: ContextInfo, result: DecryptedSum, *, round_index: int | None) -> bytes:
    """The key holder's reply to the server: the released sum (CKKS: on the grid), nothing else."""
    if info.scheme == "bfv":
        values, dtype = np.ascontiguousarray(result.integer_total, dtype="<i8"), "i8"
    else:
        values, dtype = np.ascontiguousarray(result.total, dtype="<f8"), "f8"
    head = info.link() | {
        "round": round_index,
        "count": result.count,
        "contributors": list(result.contributors),
        "length": int(values.size),
        "weight_sum": result.weight_sum,
        "dtype": dtype,
        "blobs": ["values"],
    }
    return wire.pack(wire.DECRYPTION, head, [values.tobytes()])


def read_decryption(
    info: ContextInfo, message: bytes, *, round_index: int | None, contributors: Sequence[str], length: int
) -> np.ndarray:
    """The values of a key holder's reply, checked against what the server itself aggregated.

    Returns float64 (CKKS) or int64 (BFV) values.

    Raises:
        ProtocolError: tampered bytes, another kind, key set or round, or a reply about another
            set of contributors or another length than the aggregate the server sent.
    """
    what = "decrypted sum"
    env = wire.unpack(message, what=what)
    if env.kind != wire.DECRYPTION:
        raise ProtocolError(f"{what}: expected a decrypted sum, got a {env.kind_name}")
    head = env.header
    _check_link(info, head, what=what)
    if head.get("round") != round_index:
        raise ProtocolError(f"{what} is for round {head.get('round')!r}, this server runs round {round_index!r}")
    if head.get("contributors") != list(contributors) or head.get("count") != len(contributors):
        raise ProtocolError(f"{what} names contributors {head.get('contributors')!r}, the aggregate had {list(contributors)}")
    dtype = {"bfv": "i8", "ckks": "f8"}[info.scheme]
    if head.get("dtype") != dtype or head.get("length") != length or len(env.blobs) != 1 or len(env.blobs[0]) != 8 * length:
        raise ProtocolError(f"{what}: expected {length} values of type {dtype} in one blob")
    values = np.frombuffer(env.blobs[0], dtype="<" + dtype).astype(np.int64 if dtype == "i8" else np.float64)
    if info.scheme == "ckks" and not np.all(np.isfinite(values)):
        raise ProtocolError(f"{what} holds NaN or Inf")
    return values


# ---------------------------------------------------------------------------------------------
# the parties' halves of one round (see secagg.session)
# ---------------------------------------------------------------------------------------------
def _check_round_index(round_index: int) -> None:
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise ValueError(f"round_index must be an int >= 0, got {round_index!r}")


def he_context(keys: ClientKeys | None, client_id: str) -> bytes:
    """The HE client context in a client's keys.

    Raises:
        KeyMaterialError: ``keys`` is None or holds no HE context.
    """
    context = getattr(keys, "he_context", None)
    if context is None:
        raise KeyMaterialError(
            f"client {client_id!r} needs ClientKeys(he_context=...) with the key holder's client_context({client_id!r})"
        )
    return context


def _request(info: ContextInfo, *, round_index: int, length: int) -> bytes:
    head = info.link() | {"round": round_index, "length": length, "blobs": []}
    return wire.pack(wire.REQUEST, head, [])


class KeyHolderSession:
    """The key holder party of one round: it made the round's keys and decrypts one aggregate.

    It gives the server :meth:`server_context` (parameters and public key only) and each client
    :meth:`client_context` (outside the server's reach); it answers the server's request, the
    aggregate ciphertext addressed to :data:`secagg.KEY_HOLDER`, with :meth:`handle`. It decrypts at
    most one aggregate, of this round only, so a server that deviates reads at most one sum per key set.

    What it sees: the aggregate and its public header (contributors, length, weight sum), and the
    decrypted sum; it releases the exact sum of the grid-rounded inputs (CKKS, never the raw
    decryption: see :func:`ckks_release_grid`) or the exact integer sum (BFV).
    """

    def __init__(self, holder: KeyHolderBase, *, round_index: int) -> None:
        _check_round_index(round_index)
        self._holder = holder
        self.round_index = round_index
        self.name = holder.name
        self._answered = False

    @property
    def info(self) -> ContextInfo:
        """The public parameters of this round's key set."""
        return self._holder.info

    def server_context(self) -> bytes:
        """The public context, for the server (never holds the secret key)."""
        return self._holder.public_context()

    def client_context(self, client_id: str) -> bytes:
        """What client ``client_id`` holds: the public key, or the secret key in symmetric presets."""
        if not isinstance(client_id, str) or not client_id:
            raise TypeError(f"client_id must be a non-empty str, got {client_id!r}")
        return self._holder.client_context(include_secret_key=self.info.encryption == "symmetric")

    def handle(self, message: bytes) -> bytes:
        """Decrypt the server's aggregate of this round, once, and return the decrypted sum's bytes.

        Raises:
            ProtocolError: not an aggregate of this round and key set, a second request, or a
                plaintext outside the range the contributions allow.
        """
        reply = _answer_aggregate(self._holder, message, round_index=self.round_index, answered=self._answered)
        self._answered = True
        return reply


def _answer_aggregate(party: _Decrypting, message: bytes, *, round_index: int, answered: bool) -> bytes:
    env = wire.unpack(message, what="aggregate")
    if env.kind != wire.AGGREGATE:
        raise ProtocolError(f"expected an aggregate ciphertext, got a {env.kind_name}")
    if env.header.get("round") != round_index:
        raise ProtocolError(f"aggregate is for round {env.header.get('round')!r}, this key set is for round {round_index}")
    if answered:
        raise ProtocolError(
            f"a second decryption request in round {round_index}: this key set decrypts one aggregate only "
            "(a deviating server reads at most one sum per key set)"
        )
    return decryption_message(party.info, party._decrypt(message), round_index=round_index)


class HEClientSession:
    """One client's half of an HE round: it encrypts its vector and answers the server's request.

    Holds its client context (public key, or the secret key in symmetric presets). Where it holds
    the secret key it also decrypts, once, an aggregate the server sends it when the key holder
    is silent (symmetric presets only).
    """

    def __init__(
        self, client: ClientBase, *, round_index: int, participants: Sequence[str], encrypt: Callable[[np.ndarray], bytes]
    ) -> None:
        _check_round_index(round_index)
        if client.client_id not in participants:
            raise ValueError(f"client {client.client_id!r} is not among the round's participants")
        self.client_id = client.client_id
        self.round_index = round_index
        self._client = client
        self._encrypt = encrypt
        self._message: bytes | None = None
        self._length = 0
        self._decrypted = False

    def set_input(self, vector: np.ndarray) -> None:
        """Encrypt the client's vector (BFV quantizes it with the session's own randomness)."""
        self._message = self._encrypt(vector)
        self._length = vector.size

    def handle(self, message: bytes) -> bytes | None:
        """The ciphertext for the server's request, or (secret-key holders) the decrypted aggregate.

        Raises:
            ProtocolError: a message of another round or key set, a request for another length,
                no input yet, or a second decryption request.
            KeyMaterialError: an aggregate sent to a client without the secret key.
        """
        env = wire.unpack(message, what=f"message to client {self.client_id!r}")
        if env.kind == wire.AGGREGATE:
            if not self._client.holds_secret_key:
                raise KeyMaterialError(f"client {self.client_id!r} holds no secret key; the key holder decrypts")
            reply = _answer_aggregate(self._client, message, round_index=self.round_index, answered=self._decrypted)
            self._decrypted = True
            return reply
        if env.kind != wire.REQUEST:
            raise ProtocolError(f"client {self.client_id!r} expected a ciphertext request, got a {env.kind_name}")
        _check_link(self._client.info, env.header, what="ciphertext request")
        if env.header.get("round") != self.round_index:
            raise ProtocolError(
                f"client {self.client_id!r} runs round {self.round_index}, the request is for round {env.header.get('round')!r}"
            )
        if self._message is None:
            raise ProtocolError(f"client {self.client_id!r} was asked for its ciphertext before it had an input")
        if env.header.get("length") != self._length:
            raise ProtocolError(f"client {self.client_id!r}: the request asks for length {env.header.get('length')!r}")
        return self._message


class HEServerSession:
    """The server's half of an HE round; it holds only the public context.

    Batch 1 (stage MASKED_INPUT) asks every participant for its ciphertext and adds the replies;
    batch 2 (stage UNMASK) sends the aggregate to :data:`secagg.KEY_HOLDER`. In symmetric presets,
    where every client holds the secret key, a silent key holder is replaced by one contributor
    at a time, each in its own batch. ``finish`` returns the decoded sum and the error bound the
    server computes itself from the public parameters.

    Raises (constructor):
        KeyMaterialError: a context holding a secret key, as :class:`HEServer`.
    """

    def __init__(self, *, round_index: int, participants: Sequence[str], length: int, public_context: bytes, mode: str) -> None:
        _check_round_index(round_index)
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be an int >= 1, got {length!r}")
        self._server = HEServer(public_context, round_index=round_index)
        self.round_index = round_index
        self.mode = mode
        self._participants = tuple(sorted(participants))
        self._length = length
        self._stage = Stage.MASKED_INPUT
        self._step = 0
        self._aggregate: bytes | None = None
        self._decryptors: list[str] = []
        self._asked: str | None = None
        self._values: np.ndarray | None = None
        self.bytes_up = {"ciphertext": 0, "decryption": 0}
        self.bytes_down = {"request": 0, "aggregate": 0}

    @property
    def stage(self) -> Stage:
        return self._stage

    def outgoing(self) -> dict[str, bytes]:
        """Requests to every participant; then the aggregate to the key holder (or a stand-in).

        Raises:
            DropoutError: no one who holds the secret key answered the decryption request.
        """
        info = self._server.info
        if self._step == 0:
            self._step = 1
            request = _request(info, round_index=self.round_index, length=self._length)
            self.bytes_down["request"] += len(request) * len(self._participants)
            return {cid: request for cid in self._participants}
        if self._values is not None or not self._server.contributors:
            return {}
        if self._aggregate is None:
            self._aggregate = self._server.result()
            self._stage = Stage.UNMASK
            self._decryptors = [KEY_HOLDER]
            if info.encryption == "symmetric":
                self._decryptors += sorted(self._server.contributors)
        if not self._decryptors:
            who = "key holder or contributor" if info.encryption == "symmetric" else "key holder"
            raise DropoutError(
                f"round {self.round_index}: no {who} answered the decryption request; in preset {info.preset!r} "
                + (
                    "every contributor was asked in turn"
                    if info.encryption == "symmetric"
                    else "no one else holds the secret key to decrypt the aggregate"
                )
            )
        self._asked = self._decryptors.pop(0)
        self.bytes_down["aggregate"] += len(self._aggregate)
        return {self._asked: self._aggregate}

    def receive(self, sender: str, message: bytes) -> None:
        """A ciphertext (stage MASKED_INPUT) or the decrypted sum (stage UNMASK).

        Raises:
            ProtocolError: a message from a party that was not asked, or one that fails its checks.
        """
        if self._stage == Stage.MASKED_INPUT:
            if sender not in self._participants:
                raise ProtocolError(f"ciphertext from {sender!r}, who is not a participant of round {self.round_index}")
            self._server.add(sender, message)
            self.bytes_up["ciphertext"] += len(message)
            return
        if sender != self._asked or self._values is not None:
            raise ProtocolError(f"a decrypted sum from {sender!r}, who was not asked for one")
        self._values = read_decryption(
            self._server.info,
            message,
            round_index=self.round_index,
            contributors=self._server.contributors,
            length=self._length,
        )
        self.bytes_up["decryption"] += len(message)

    def finish(self) -> SumResult:
        """The decoded sum of the contributors, with the stated bound for their count."""
        info = self._server.info
        contributors = tuple(sorted(self._server.contributors))
        dropped = tuple(c for c in self._participants if c not in contributors)
        if not contributors:
            total, bound = np.zeros(self._length, dtype=np.float64), 0.0
        elif self._values is None:
            raise ProtocolError("finish() before the decrypted sum arrived")
        else:
            total = self._values * info.step if info.scheme == "bfv" else self._values
            bound = info.error_bound(len(contributors))
        return SumResult(
            total=np.asarray(total, dtype=np.float64),
            contributors=contributors,
            dropped=dropped,
            bytes_up=dict(self.bytes_up),
            bytes_down=dict(self.bytes_down),
            max_abs_error=bound,
            mode=self.mode,
        )


def run_session_round(
    backend,
    updates: Mapping[str, np.ndarray],
    *,
    round_index: int,
    rng: np.random.Generator,
    dropouts: Mapping[str, Stage] | None,
    value_bound: float | None,
    max_clients: int | None,
    key_holder: str | None,
) -> SumResult:
    """One round in process: the key holder, client and server sessions through ``drive_round``.

    ``backend`` provides ``key_holder_session``, ``client_session`` and ``server_session`` (an HE
    backend, or :class:`secagg.SelectiveSum` over any backends with sessions); ``value_bound`` and
    ``max_clients`` (None: left to the sessions) are checked before any party runs.

    Stages as in masked rounds: silent from ADVERTISE_KEYS means the client never received a
    context; silent from SHARE_KEYS or MASKED_INPUT means no ciphertext; silent only at UNMASK
    means its ciphertext was sent and counts. A named key holder client is one party with the
    key holder: silent together.

    Raises:
        ValueError / TypeError: as :func:`secagg.check_updates`, or dropouts naming unknown clients.
        OverflowRiskError: more clients than ``max_clients``.
        DropoutError: the named key holder went silent before keys were out, or no one who
            holds the secret key is left to decrypt.
    """
    ids, length = check_updates(updates, value_bound=value_bound)
    dropouts = dict(dropouts or {})
    for cid, stage in dropouts.items():
        if cid not in updates:
            raise ValueError(f"dropouts names client {cid!r}, which has no update in this round")
        if not isinstance(stage, Stage):
            raise TypeError(f"dropouts[{cid!r}] must be a secagg.Stage, got {stage!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if max_clients is not None and len(ids) > max_clients:
        raise OverflowRiskError(f"{len(ids)} clients in this round, but the encoding was sized for max_clients={max_clients}")
    if key_holder is not None and dropouts.get(key_holder) == Stage.ADVERTISE_KEYS:
        raise DropoutError(
            f"key holder {key_holder!r} went silent at ADVERTISE_KEYS, before any key was distributed; "
            "nothing was encrypted or revealed"
        )
    holder = backend.key_holder_session(round_index=round_index)
    public = holder.server_context()
    server = backend.server_session(round_index=round_index, participants=ids, length=length, public_context=public)
    parties = {KEY_HOLDER: holder.handle}
    bytes_down = 0
    for cid, client_rng in zip(ids, rng.spawn(len(ids))):
        if dropouts.get(cid) == Stage.ADVERTISE_KEYS:
            continue  # it never received its context
        context = holder.client_context(cid)
        bytes_down += len(context)
        session = backend.client_session(
            cid, round_index=round_index, participants=ids, rng=client_rng, keys=ClientKeys(he_context=context)
        )
        session.set_input(updates[cid])
        parties[cid] = session.handle
    silent = dict(dropouts)
    if key_holder is not None and key_holder in dropouts:
        silent[KEY_HOLDER] = dropouts[key_holder]
    result = drive_round(server, parties, dropouts=silent)
    return replace(
        result,
        dropped=tuple(c for c in result.dropped if c != KEY_HOLDER),
        bytes_up={"public_context": len(public), **result.bytes_up},
        bytes_down={"client_context": bytes_down, **result.bytes_down},
    )
