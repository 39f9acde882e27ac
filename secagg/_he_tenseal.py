"""The compatibility engine: TenSEAL's high-level ``ts.ckks_vector`` (what NVIDIA FLARE uses).

CKKS, N=8192, coefficient moduli [60, 40, 40], scale 2^40, public-key encryption, one
``ckks_vector`` per chunk of N/2 values, each serialized by TenSEAL (protobuf around SEAL's
format). Same interface as :class:`secagg._he_seal.SealEngine`, so the roles do not care.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ._he_seal import SEAL_ERRORS
from .errors import KeyMaterialError, ProtocolError

try:
    import tenseal as ts
except ImportError as exc:  # pragma: no cover - tenseal is a declared dependency
    raise ImportError("secagg's homomorphic backends need TenSEAL: pip install 'tenseal>=0.3.14'") from exc

__all__ = ["TensealEngine", "is_private_tenseal_context"]


def is_private_tenseal_context(obj: object) -> bool:
    """True for a live ``tenseal.Context`` that holds a secret key."""
    return isinstance(obj, ts.Context) and obj.is_private()


class TensealEngine:
    """CKKS through ``tenseal.ckks_vector`` with public-key encryption (single-threaded)."""

    def __init__(self, *, poly_modulus_degree: int, coeff_mod_bit_sizes: tuple[int, ...], scale: float, context) -> None:
        self.poly_modulus_degree = poly_modulus_degree
        self.coeff_mod_bit_sizes = coeff_mod_bit_sizes
        self.scale = scale
        self.values_per_ciphertext = poly_modulus_degree // 2
        self._ctx = context

    @classmethod
    def generate(cls, *, poly_modulus_degree: int, coeff_mod_bit_sizes: tuple[int, ...], scale: float) -> "TensealEngine":
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=poly_modulus_degree,
            coeff_mod_bit_sizes=list(coeff_mod_bit_sizes),
            encryption_type=ts.ENCRYPTION_TYPE.ASYMMETRIC,
            n_threads=1,
        )
        ctx.global_scale = scale
        return cls(poly_modulus_degree=poly_modulus_degree, coeff_mod_bit_sizes=coeff_mod_bit_sizes, scale=scale, context=ctx)

    @classmethod
    def from_blobs(
        cls,
        *,
        poly_modulus_degree: int,
        coeff_mod_bit_sizes: tuple[int, ...],
        scale: float,
        blobs: Mapping[str, bytes],
        what: str,
    ) -> "TensealEngine":
        blob = blobs.get("tenseal_context")
        if blob is None:
            raise ProtocolError(f"{what} carries no 'tenseal_context' blob")
        try:
            ctx = ts.context_from(blob, n_threads=1)
        except SEAL_ERRORS as exc:
            raise ProtocolError(f"{what}: TenSEAL cannot parse the context ({exc})") from None
        if ctx.global_scale != scale:
            raise KeyMaterialError(f"{what}: TenSEAL context scale {ctx.global_scale!r} differs from the header's {scale!r}")
        return cls(poly_modulus_degree=poly_modulus_degree, coeff_mod_bit_sizes=coeff_mod_bit_sizes, scale=scale, context=ctx)

    @property
    def holds_secret_key(self) -> bool:
        return self._ctx.is_private()

    @property
    def can_encrypt(self) -> bool:
        return self._ctx.has_public_key()

    def export(self, *, secret_key: bool, public_key: bool) -> dict[str, bytes]:
        if secret_key and not self._ctx.is_private():
            raise KeyMaterialError("this engine holds no secret key to export")
        data = self._ctx.serialize(
            save_public_key=public_key or secret_key,
            save_secret_key=secret_key,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        return {"tenseal_context": data}

    def encrypt(self, plain: np.ndarray) -> list[bytes]:
        if not self.can_encrypt:
            raise KeyMaterialError("this context holds no public key: it cannot encrypt")
        rows = plain.reshape(-1, self.values_per_ciphertext)
        return [ts.ckks_vector(self._ctx, row.tolist()).serialize() for row in rows]

    def _load(self, blob: bytes, *, what: str):
        try:
            vec = ts.ckks_vector_from(self._ctx, blob)
        except SEAL_ERRORS as exc:
            raise ProtocolError(f"{what}: TenSEAL rejects the bytes ({exc}); tampered, or made under other parameters") from None
        if vec.size() != self.values_per_ciphertext:
            raise ProtocolError(f"{what}: vector holds {vec.size()} values, expected {self.values_per_ciphertext}")
        return vec

    def accumulate(self, acc: list | None, blobs: Sequence[bytes], *, what: str) -> list:
        loaded = [self._load(b, what=f"{what}, ciphertext {i}") for i, b in enumerate(blobs)]
        if acc is None:
            return loaded
        if len(acc) != len(loaded):
            raise ProtocolError(f"{what}: {len(loaded)} ciphertexts, the others sent {len(acc)}")
        for total, vec in zip(acc, loaded):
            try:
                total.add_(vec)
            except SEAL_ERRORS as exc:
                raise ProtocolError(f"{what}: cannot add ({exc})") from None
        return acc

    def dump(self, acc: Sequence) -> list[bytes]:
        return [vec.serialize() for vec in acc]

    def decrypt(self, blobs: Sequence[bytes], *, what: str) -> np.ndarray:
        if not self._ctx.is_private():
            raise KeyMaterialError(f"{what}: this party holds no secret key and cannot decrypt")
        out = [
            np.asarray(self._load(blob, what=f"{what}, ciphertext {i}").decrypt(), dtype=np.float64)
            for i, blob in enumerate(blobs)
        ]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float64)
