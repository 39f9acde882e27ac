"""Roles of homomorphic aggregation (key holder, client, server) and one in-process round.

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
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from . import _he_wire as wire
from ._he_seal import SEAL_ERRORS, SealEngine, SealSpec, coeff_modulus_values, new_key_id, spec_fingerprint
from ._he_tenseal import TensealEngine, is_private_tenseal_context
from .base import Stage, SumResult, check_updates
from .errors import DropoutError, KeyMaterialError, OverflowRiskError, ProtocolError

__all__ = [
    "ContextInfo",
    "DecryptedSum",
    "HEServer",
    "KeyHolderBase",
    "ClientBase",
    "ckks_error_bound",
    "ckks_fresh_noise_coeff_bound",
    "ckks_largest_scale_bits",
    "data_modulus",
    "run_round",
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


def ckks_largest_scale_bits(
    *, poly_modulus_degree: int, coeff_mod_bit_sizes: tuple[int, ...], encryption: str,
    reals_per_slot: int, value_bound: float, max_clients: int,
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
        return {"scheme": self.scheme, "preset": self.preset, "fingerprint": self.fingerprint,
                "scale": self.scale, "key_id": self.key_id}

    def spec(self) -> SealSpec:
        return SealSpec(
            scheme=self.scheme,
            poly_modulus_degree=self.poly_modulus_degree,
            coeff_mod_bit_sizes=self.coeff_mod_bit_sizes,
            plain_modulus_bits=self.plain_modulus_bits,
            reals_per_slot=self.reals_per_slot,
            encryption=self.encryption,
        )

    def error_bound(self, count: int) -> float:
        """The stated precision of a sum of ``count`` contributions."""
        if count <= 0:
            return 0.0
        if self.scheme == "bfv":
            # stochastic rounding moves each client's coordinate by less than one step
            return count * self.step * (1 + 1e-9)
        return ckks_error_bound(
            poly_modulus_degree=self.poly_modulus_degree, encryption=self.encryption,
            reals_per_slot=self.reals_per_slot, scale=self.scale, value_bound=self.value_bound, count=count,
        )

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
            scheme=get("scheme", str), preset=get("preset", str), engine=get("engine", str),
            encryption=get("encryption", str), poly_modulus_degree=get("poly_modulus_degree", int),
            coeff_mod_bit_sizes=tuple(bits), plain_modulus_bits=get("plain_modulus_bits", int, optional=True),
            reals_per_slot=get("reals_per_slot", int), values_per_ciphertext=get("values_per_ciphertext", int),
            fingerprint=get("fingerprint", str), key_id=get("key_id", str), holder=get("holder", str),
            scale=float(get("scale", (int, float))), value_bound=float(get("value_bound", (int, float))),
            max_clients=get("max_clients", int), quant_bits=get("quant_bits", int, optional=True),
            step=get("step", (int, float), optional=True), levels=get("levels", int, optional=True),
        )
        if info.scheme not in ("ckks", "bfv") or info.engine not in ("sealapi", "tenseal"):
            raise ProtocolError(f"{what}: unknown scheme/engine {info.scheme!r}/{info.engine!r}")
        if info.encryption not in ("symmetric", "public-key"):
            raise ProtocolError(f"{what}: unknown encryption {info.encryption!r}")
        if info.poly_modulus_degree not in (1024, 2048, 4096, 8192, 16384, 32768):
            raise ProtocolError(
                f"{what}: poly_modulus_degree {info.poly_modulus_degree} is not a supported power of two"
            )
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


def build_engine(info: ContextInfo, envelope: wire.Envelope, *, what: str):
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
            poly_modulus_degree=info.poly_modulus_degree, coeff_mod_bit_sizes=info.coeff_mod_bit_sizes,
            scale=info.scale, blobs=blobs, what=what,
        )
    return SealEngine.from_blobs(info.spec(), blobs, scale=info.scale, what=what)


def generate_engine(info_fields: Mapping[str, object]):
    """Fresh keys for the preset described by ``info_fields`` (a key holder's job)."""
    if info_fields["engine"] == "tenseal":
        return TensealEngine.generate(
            poly_modulus_degree=info_fields["poly_modulus_degree"],
            coeff_mod_bit_sizes=tuple(info_fields["coeff_mod_bit_sizes"]),
            scale=info_fields["scale"],
        )
    spec = SealSpec(
        scheme=info_fields["scheme"], poly_modulus_degree=info_fields["poly_modulus_degree"],
        coeff_mod_bit_sizes=tuple(info_fields["coeff_mod_bit_sizes"]),
        plain_modulus_bits=info_fields.get("plain_modulus_bits"),
        reals_per_slot=info_fields["reals_per_slot"], encryption=info_fields["encryption"],
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
    _engine: object

    def _decrypt(self, aggregate: bytes) -> DecryptedSum:
        what = "aggregate"
        env = wire.unpack(aggregate, what=what)
        if env.kind != wire.AGGREGATE:
            raise ProtocolError(f"expected an aggregate ciphertext, got a {env.kind_name}")
        head = env.header
        _check_link(self._info, head, what=what)
        count, length, weight_sum = head.get("count"), head.get("length"), head.get("weight_sum")
        contributors = head.get("contributors")
        if not (isinstance(count, int) and isinstance(length, int) and isinstance(weight_sum, (int, float))
                and isinstance(contributors, list) and len(contributors) == count and length >= 1):
            raise ProtocolError(f"{what}: malformed count/length/weight_sum/contributors in its header")
        if count < 1 or count > self._info.max_clients:
            raise OverflowRiskError(
                f"{what} sums {count} contributions; this key set was made for 1..max_clients="
                f"{self._info.max_clients}"
            )
        per = self._info.values_per_ciphertext
        if len(env.blobs) != -(-length // per):
            raise ProtocolError(f"{what}: {len(env.blobs)} ciphertexts cannot hold {length} values ({per} each)")
        raw = self._engine.decrypt(env.blobs, what=what)
        bound = self._info.error_bound(count)
        if self._info.scheme == "bfv":
            limit = count * self._info.levels
            if np.any(np.abs(raw[:length]) > limit) or np.any(raw[length:] != 0):
                raise ProtocolError(
                    f"{what} decrypts outside the possible range (|sum| <= {limit}): wrong key, or tampered"
                )
            total = raw[:length].astype(np.float64) * self._info.step
            integer_total = raw[:length].copy()
        else:
            limit = count * self._info.value_bound + bound
            if np.any(np.abs(raw[:length]) > limit) or np.any(np.abs(raw[length:]) > bound):
                raise ProtocolError(
                    f"{what} decrypts outside the possible range (|sum| <= {limit:.6g}): wrong key, or tampered"
                )
            total = raw[:length].astype(np.float64, copy=True)
            integer_total = None
        return DecryptedSum(
            total=total, count=count, weight_sum=float(weight_sum), contributors=tuple(contributors),
            max_abs_error=bound, integer_total=integer_total,
        )


class KeyHolderBase(_Decrypting):
    """Creates a key set; hands out the public and client contexts; decrypts the aggregate."""

    def __init__(self, info_fields: Mapping[str, object], *, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        fields = dict(info_fields)
        self._engine = generate_engine(fields)
        fields.update(key_id=new_key_id(), holder=name)
        fields["coeff_mod_bit_sizes"] = tuple(fields["coeff_mod_bit_sizes"])
        fields["fingerprint"] = spec_fingerprint(
            SealSpec(scheme=fields["scheme"], poly_modulus_degree=fields["poly_modulus_degree"],
                     coeff_mod_bit_sizes=fields["coeff_mod_bit_sizes"],
                     plain_modulus_bits=fields.get("plain_modulus_bits"))
        )
        self._info = ContextInfo(**fields)
        self.name = name

    @property
    def info(self) -> ContextInfo:
        return self._info

    @property
    def key_id(self) -> str:
        return self._info.key_id

    @property
    def scale(self) -> float:
        return self._info.scale

    def public_context(self) -> bytes:
        """Bytes for the server: parameters (and the public key in public-key presets), no secret key."""
        blobs = self._engine.export(secret_key=False, public_key=True)
        return wire.pack(wire.PUBLIC_CONTEXT, self._info.header(has_secret_key=False, blobs=list(blobs)),
                         list(blobs.values()))

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
        return wire.pack(wire.CLIENT_CONTEXT, self._info.header(has_secret_key=include_secret_key, blobs=list(blobs)),
                         list(blobs.values()))

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
    def info(self) -> ContextInfo:
        return self._info

    @property
    def holds_secret_key(self) -> bool:
        return self._engine.holds_secret_key

    def _seal(self, plain: np.ndarray, *, length: int, weight: float) -> bytes:
        number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not (number and math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
        blobs = self._engine.encrypt(plain)
        head = self._info.link() | {"client": self.client_id, "length": length, "weight": float(weight),
                                    "blobs": [str(i) for i in range(len(blobs))]}
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

    def __init__(self, public_context: bytes) -> None:
        if isinstance(public_context, (KeyHolderBase, ClientBase)) or is_private_tenseal_context(public_context):
            raise KeyMaterialError(
                "the server refuses a context that holds a secret key (a key holder, a client object, a "
                "private TenSEAL context); pass the bytes of key_holder.public_context()"
            )
        what = "server context"
        env = wire.unpack(public_context, what=what)
        if env.header.get("has_secret_key") is not False or "secret_key" in env.header.get("blobs", []):
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
            ProtocolError: tampered/truncated bytes, a message of another client or key set, a
                duplicate, or a vector length different from the others'.
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
            "length": self._length, "count": len(self._contributors), "weight_sum": self._weight_sum,
            "contributors": list(self._contributors), "blobs": [str(i) for i in range(len(blobs))],
        }
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
# one in-process round
# ---------------------------------------------------------------------------------------------
def run_round(
    *,
    mode: str,
    updates: Mapping[str, np.ndarray],
    dropouts: Mapping[str, Stage] | None,
    value_bound: float,
    max_clients: int,
    key_holder: str | None,
    make_key_holder: Callable[[str], KeyHolderBase],
    make_client: Callable[[bytes, str], ClientBase],
    encrypt: Callable[[ClientBase, np.ndarray], bytes],
) -> SumResult:
    """Run one HE round in process: keys, client encryption, server sum, decryption.

    Stages as in masked rounds: silent from ADVERTISE_KEYS means the client never received a
    context; silent from SHARE_KEYS or MASKED_INPUT means no ciphertext; silent only at UNMASK
    means its ciphertext was sent and counts (it just does not help decrypt).

    Raises:
        ValueError / TypeError: as :func:`secagg.check_updates`, or dropouts naming unknown clients.
        OverflowRiskError: more clients than ``max_clients``.
        DropoutError: the named key holder went silent before keys were out, or no one who
            holds the secret key is left to decrypt.
    """
    ids, _length = check_updates(updates, value_bound=value_bound)
    dropouts = dict(dropouts or {})
    for cid, stage in dropouts.items():
        if cid not in updates:
            raise ValueError(f"dropouts names client {cid!r}, which has no update in this round")
        if not isinstance(stage, Stage):
            raise TypeError(f"dropouts[{cid!r}] must be a secagg.Stage, got {stage!r}")
    if len(ids) > max_clients:
        raise OverflowRiskError(
            f"{len(ids)} clients in this round, but the encoding was sized for max_clients={max_clients}"
        )
    contributors = [c for c in ids if dropouts.get(c, Stage.UNMASK) > Stage.MASKED_INPUT]
    dropped = tuple(sorted(dropouts))
    holder_name = key_holder if key_holder is not None else "key-service"
    holder_stage = dropouts.get(key_holder) if key_holder is not None else None
    if holder_stage == Stage.ADVERTISE_KEYS:
        raise DropoutError(
            f"key holder {key_holder!r} went silent at ADVERTISE_KEYS, before any key was distributed; "
            "nothing was encrypted or revealed"
        )
    holder = make_key_holder(holder_name)
    public_ctx = holder.public_context()
    server = HEServer(public_ctx)
    symmetric = holder.info.encryption == "symmetric"
    client_ctx = holder.client_context(include_secret_key=symmetric)
    receivers = [c for c in ids if dropouts.get(c) != Stage.ADVERTISE_KEYS and c != key_holder]
    bytes_up = {"public_context": len(public_ctx), "ciphertext": 0}
    bytes_down = {"client_context": len(client_ctx) * len(receivers), "aggregate": 0}
    clients: dict[str, ClientBase] = {}
    for cid in contributors:
        context = holder.client_context(include_secret_key=True) if cid == key_holder else client_ctx
        clients[cid] = make_client(context, cid)
        message = encrypt(clients[cid], updates[cid])
        bytes_up["ciphertext"] += len(message)
        server.add(cid, message)
    if not contributors:
        total = np.zeros(_length, dtype=np.float64)
        return SumResult(total=total, contributors=(), dropped=dropped, bytes_up=bytes_up,
                         bytes_down=bytes_down, max_abs_error=0.0, mode=mode)
    aggregate = server.result()
    bytes_down["aggregate"] = len(aggregate)
    if holder_stage is None:
        decrypted = holder.decrypt(aggregate)
    elif symmetric:
        alive = [c for c in contributors if c not in dropouts and c != key_holder]
        if not alive:
            raise DropoutError(
                f"key holder {key_holder!r} went silent at {holder_stage.name} and no other client holding "
                "the secret key is left to decrypt the aggregate"
            )
        decrypted = clients[alive[0]].decrypt(aggregate)
    else:
        raise DropoutError(
            f"key holder {key_holder!r} went silent at {holder_stage.name}; in public-key preset "
            f"{holder.info.preset!r} no one else holds the secret key to decrypt the aggregate"
        )
    if tuple(sorted(decrypted.contributors)) != tuple(contributors):
        raise ProtocolError(f"aggregate names contributors {decrypted.contributors}, expected {contributors}")
    return SumResult(
        total=decrypted.total,
        contributors=tuple(contributors),
        dropped=dropped,
        bytes_up=bytes_up,
        bytes_down=bytes_down,
        max_abs_error=decrypted.max_abs_error,
        mode=mode,
    )
