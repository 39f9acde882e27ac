"""Signed fixed-point encoding of float vectors into the ring Z_2^b, and packing.

A client's float vector ``x`` (clipped per coordinate to ``[-clip, clip]`` and weighted by
at most ``weight_bound``, so ``|x_i| <= value_bound = clip * weight_bound``) becomes the
integers ``floor(x_i * scale + u_i)`` with ``u_i`` uniform in [0, 1) drawn from the passed
generator (stochastic rounding: unbiased, error below one step ``1 / scale``), stored as
two's-complement words of b bits. Sums of up to ``max_clients`` such vectors, plus the
headroom that distributed integer noise asks for, never leave the signed range
``[-2^(b-1), 2^(b-1) - 1]``, so decoding the wrapped ring sum gives the exact integer sum.

Scale: ``scale = P / value_bound`` with ``P`` the largest integer such that
``max_clients * P + noise_headroom(scale) <= 2^(b-1) - 1``. Settings where no ``P >= 1``
fits are refused with :class:`OverflowRiskError` naming the numbers.

Who sees what: the encoder runs on the client; the server only ever sees the decoded sum.
"""

from __future__ import annotations

import math

import numpy as np

from .base import IntegerNoise
from .errors import OverflowRiskError

__all__ = ["FixedPointEncoder", "SUPPORTED_BITS", "pack", "unpack"]

SUPPORTED_BITS = (32, 64)
_DTYPES: dict[int, np.dtype] = {32: np.dtype("<u4"), 64: np.dtype("<u8")}
_SIGNED: dict[int, np.dtype] = {32: np.dtype("<i4"), 64: np.dtype("<i8")}


def _positive_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


class FixedPointEncoder:
    """Fixed point in Z_2^b with stochastic rounding; derives its scale from the bounds.

    Args:
        value_bound: per-coordinate bound of one client's (clipped) input, before weighting.
        max_clients: the most vectors that will ever be summed.
        bits: ring width b, 32 (default) or 64.
        weight_bound: the largest aggregation weight a client's vector is multiplied by;
            the encoder bounds ``|x_i| <= value_bound * weight_bound``.
        integer_noise: distributed noise each client adds in the integer domain; its
            ``sum_bound(scale=, num_clients=max_clients)`` is reserved as headroom.

    Raises:
        ValueError: a bound that is not finite and positive, ``max_clients < 1``, or
            unsupported ``bits``.
        OverflowRiskError: no scale with at least one integer step per ``value_bound`` keeps
            ``max_clients`` inputs plus the noise headroom inside ``b`` signed bits.
    """

    def __init__(
        self,
        *,
        value_bound: float,
        max_clients: int,
        bits: int = 32,
        weight_bound: float = 1.0,
        integer_noise: IntegerNoise | None = None,
    ) -> None:
        clip = _positive_finite("value_bound", value_bound)
        weight = _positive_finite("weight_bound", weight_bound)
        if isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1:
            raise ValueError(f"max_clients must be an int >= 1, got {max_clients!r}")
        self._bits = check_bits(bits)
        if integer_noise is not None and not isinstance(integer_noise, IntegerNoise):
            raise TypeError(f"integer_noise must implement IntegerNoise, got {type(integer_noise).__name__}")
        self._value_bound = clip * weight
        self._clip = clip
        self._weight_bound = weight
        self._max_clients = max_clients
        self._noise = integer_noise
        limit = (1 << (self._bits - 1)) - 1
        p_max = limit // max_clients
        if p_max < 1:
            raise OverflowRiskError(
                f"bits={self._bits} cannot hold a sum of max_clients={max_clients} values: "
                f"even one step each needs {max_clients} > 2^{self._bits - 1} - 1 = {limit}"
            )

        def headroom(p: int) -> int:
            if integer_noise is None:
                return 0
            bound = float(integer_noise.sum_bound(scale=p / self._value_bound, num_clients=max_clients))
            if not math.isfinite(bound) or bound < 0:
                raise ValueError(f"integer_noise.sum_bound returned {bound!r}; expected a finite number >= 0")
            return math.ceil(bound)

        def fits(p: int) -> bool:
            return max_clients * p + headroom(p) <= limit

        if not fits(1):
            raise OverflowRiskError(
                f"bits={self._bits} cannot hold max_clients={max_clients} inputs of magnitude "
                f"{self._value_bound:g} plus the noise headroom {headroom(1)} even at scale "
                f"{1 / self._value_bound:g} (one step per value_bound): "
                f"{max_clients} * 1 + {headroom(1)} > {limit}; use bits=64, fewer clients or less noise"
            )
        lo, hi = 1, p_max  # largest p with fits(p); sum_bound grows with the scale
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        self._p = lo
        self._headroom = headroom(lo)
        self._scale = lo / self._value_bound
        # Largest float not above P, so the float clip never yields P + 1 after the cast.
        pf = float(lo)
        if int(pf) > lo:
            pf = float(np.nextafter(pf, 0.0))
        self._pf = pf

    # -- read-only description -------------------------------------------------------
    @property
    def bits(self) -> int:
        """Ring size: vectors live in Z_2^bits."""
        return self._bits

    @property
    def dtype(self) -> np.dtype:
        """Unsigned little-endian word type of the ring (``<u4`` or ``<u8``)."""
        return _DTYPES[self._bits]

    @property
    def scale(self) -> float:
        """Integer steps per unit: an input ``x`` encodes to about ``x * scale``."""
        return self._scale

    @property
    def step(self) -> float:
        """Value of one integer step, ``1 / scale``: the encoder's resolution."""
        return 1.0 / self._scale

    @property
    def value_bound(self) -> float:
        """Largest accepted ``|x_i|`` (clip bound times weight bound)."""
        return self._value_bound

    @property
    def max_clients(self) -> int:
        """The most inputs whose sum cannot wrap around the ring."""
        return self._max_clients

    @property
    def per_client_bound(self) -> int:
        """Largest ``|encoded_i|`` of one client, before noise."""
        return self._p

    @property
    def noise_headroom(self) -> int:
        """Integer headroom reserved for the summed distributed noise."""
        return self._headroom

    def error_bound(self, num_clients: int) -> float:
        """Bound on ``|decode(sum) - exact sum|`` per coordinate for ``num_clients`` inputs.

        Each stochastic rounding errs by less than one step; the float64 product
        ``x * scale`` and the final division add at most a few units in the last place,
        which the second term covers. Noise is not included.
        """
        m = int(num_clients)
        ulp_int = 2.0**-52 * (self._p + 1)  # float error of x*scale (+u), in steps
        return m * (1.0 + ulp_int) / self._scale + 2.0**-52 * m * (self._value_bound + 1.0 / self._scale)

    def describe(self) -> dict[str, object]:
        """Ring, scale, bounds and noise headroom, JSON data for reports."""
        return {
            "bits": self._bits,
            "scale": self._scale,
            "step": self.step,
            "value_bound": self._value_bound,
            "weight_bound": self._weight_bound,
            "max_clients": self._max_clients,
            "per_client_bound": self._p,
            "noise_headroom": self._headroom,
        }

    # -- encoding --------------------------------------------------------------------
    def _rounded(self, x: np.ndarray, rng: np.random.Generator, who: str) -> np.ndarray:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        x = np.asarray(x)
        if x.ndim != 1:
            raise ValueError(f"{who} must be a 1-D vector, got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{who} holds NaN or Inf")
        if x.size:
            peak = float(np.max(np.abs(x)))
            if peak > self._value_bound:
                raise ValueError(f"{who} has a coordinate of magnitude {peak:.6g}, above value_bound={self._value_bound!r}")
        v = np.multiply(x, self._scale, dtype=np.float64)
        v += rng.random(v.size)
        np.floor(v, out=v)
        np.clip(v, -self._pf, self._pf, out=v)
        return v

    def quantize(self, x: np.ndarray, *, rng: np.random.Generator, who: str = "input") -> np.ndarray:
        """Stochastically round ``x * scale`` to int64 in ``[-P, P]``.

        Raises:
            ValueError: not a 1-D finite array, or a coordinate beyond ``value_bound``.
            TypeError: ``rng`` is not a ``numpy.random.Generator``.
        """
        return self._rounded(x, rng, who).astype(np.int64)

    def wrap(self, ints: np.ndarray) -> np.ndarray:
        """Signed int64 values to ring words (two's complement modulo 2^b)."""
        ints = np.asarray(ints, dtype=np.int64)
        if self._bits == 64:
            return ints.view(np.uint64).astype(self.dtype, copy=True)
        return ints.astype(self.dtype)

    def encode(self, x: np.ndarray, *, rng: np.random.Generator, who: str = "input") -> np.ndarray:
        """Quantize and wrap: the ring words a client masks (same values as ``wrap(quantize(x))``)."""
        v = self._rounded(x, rng, who)
        if self._bits == 32:  # |v| <= P < 2^31: straight to two's-complement 32-bit words
            return v.astype(np.int32).view(self.dtype)
        return v.astype(np.int64).view(self.dtype)

    def to_signed(self, words: np.ndarray) -> np.ndarray:
        """Ring words (a sum) as signed int64, reading the top bit as the sign."""
        words = np.ascontiguousarray(words, dtype=self.dtype)
        return words.view(_SIGNED[self._bits]).astype(np.int64)

    def decode(self, words: np.ndarray, *, num_clients: int) -> np.ndarray:
        """Float64 value of the ring sum of ``num_clients`` encoded inputs.

        Raises:
            OverflowRiskError: ``num_clients`` exceeds ``max_clients`` (the sum may have wrapped).
        """
        if num_clients > self._max_clients:
            raise OverflowRiskError(
                f"cannot decode a sum of {num_clients} inputs: the encoder was sized for max_clients={self._max_clients}"
            )
        return self.to_signed(words).astype(np.float64) / self._scale


def pack(words: np.ndarray, *, bits: int) -> bytes:
    """Ring words as little-endian bytes, exactly ``bits / 8`` bytes per coordinate."""
    check_bits(bits)
    return np.ascontiguousarray(words, dtype=_DTYPES[bits]).tobytes()


def unpack(data: bytes | memoryview, *, bits: int, length: int) -> np.ndarray:
    """Inverse of :func:`pack` (read-only view on ``data``).

    Raises:
        ValueError: ``data`` does not hold exactly ``length`` words of ``bits`` bits.
    """
    check_bits(bits)
    need = length * bits // 8
    if len(data) != need:
        raise ValueError(f"packed vector holds {len(data)} bytes, expected {need} ({length} x {bits} bits)")
    return np.frombuffer(data, dtype=_DTYPES[bits])
