"""SEAL through ``tenseal.sealapi``: parameters, keys, byte (de)serialization, encrypt/add/decrypt.

The low-level binding shipped inside TenSEAL exposes SEAL's ``save``/``load`` only with a file
path, never with an in-memory stream. We therefore serialize through one anonymous in-memory
file per thread (``memfd_create``, reached as ``/proc/self/fd/N``), so key material and
ciphertexts never touch a disk; on systems without memfd a private temporary file (mode 0600)
is used instead. What SEAL writes is its own format (16-byte ``SEALHeader``, then the object,
zstd-compressed by default); seeded symmetric ciphertexts store their second polynomial as a
64-byte PRNG seed, which is what halves the upload.

Who holds what: an engine built with a secret key can encrypt (symmetric presets) and decrypt;
one built with a public key can encrypt only; one built from the parameters alone (the
server's) can only load, check and add ciphertexts.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np

from .errors import KeyMaterialError, ProtocolError

try:
    import tenseal.sealapi as seal
except ImportError as exc:  # pragma: no cover - tenseal is a declared dependency
    raise ImportError("secagg's homomorphic backends need TenSEAL: pip install 'tenseal>=0.3.14'") from exc

__all__ = [
    "SealSpec",
    "SealEngine",
    "SEAL_ERRORS",
    "check_seal_blob",
    "coeff_modulus_values",
    "plain_modulus_value",
    "spec_fingerprint",
]

#: Exceptions pybind11 raises for SEAL's std::invalid_argument / logic_error / out_of_range.
SEAL_ERRORS = (ValueError, RuntimeError, IndexError, OverflowError, TypeError)

_SEAL_MAGIC = 0xA15E
_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compression, reserved, size
_COMPRESSION_MODES = (0, 1, 2)  # none, zlib, zstd


class _Scratch(threading.local):
    """One in-memory file per thread through which SEAL objects are saved and loaded."""

    def __init__(self) -> None:
        self._open()

    def _open(self) -> None:
        self.pid = os.getpid()
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            self.fd = os.memfd_create("secagg-he", getattr(os, "MFD_CLOEXEC", 0))
            self.path = f"/proc/self/fd/{self.fd}"
        else:  # pragma: no cover - non-Linux fallback
            folder = tempfile.mkdtemp(prefix="secagg-he-")
            self.path = os.path.join(folder, "blob")
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def _own(self) -> None:
        if self.pid != os.getpid():  # a forked child must not share the parent's file
            self._open()

    def dump(self, obj) -> bytes:
        self._own()
        obj.save(self.path)
        size = os.fstat(self.fd).st_size
        chunks, offset = [], 0
        while offset < size:
            chunk = os.pread(self.fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        os.ftruncate(self.fd, 0)  # leave no key material behind
        return b"".join(chunks)

    def load(self, obj, context, data: bytes) -> None:
        self._own()
        os.ftruncate(self.fd, 0)
        view, offset = memoryview(data), 0
        while offset < len(data):
            offset += os.pwrite(self.fd, view[offset:], offset)
        try:
            obj.load(context, self.path)
        finally:
            os.ftruncate(self.fd, 0)


_SCRATCH = _Scratch()


def check_seal_blob(blob: bytes, *, what: str) -> None:
    """Check SEAL's 16-byte header before SEAL parses the rest (clear errors, no huge reads).

    Raises:
        ProtocolError: too short, wrong magic, unknown compression, or a declared size that
            differs from the blob's length (truncated or padded).
    """
    if len(blob) < _SEAL_HEADER.size:
        raise ProtocolError(f"{what} is truncated: {len(blob)} bytes, shorter than SEAL's 16-byte header")
    magic, head_size, _major, _minor, compression, _reserved, size = _SEAL_HEADER.unpack_from(blob, 0)
    if magic != _SEAL_MAGIC or head_size != _SEAL_HEADER.size:
        raise ProtocolError(f"{what} is not a SEAL serialization (magic {magic:#06x}, header size {head_size})")
    if compression not in _COMPRESSION_MODES:
        raise ProtocolError(f"{what} declares unknown SEAL compression mode {compression}")
    if size != len(blob):
        raise ProtocolError(f"{what} is truncated or padded: SEAL header declares {size} bytes, got {len(blob)}")


@dataclass(frozen=True)
class SealSpec:
    """What fixes a SEAL parameter set (and therefore compatibility between parties)."""

    scheme: str  # "ckks" or "bfv"
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    plain_modulus_bits: int | None = None  # BFV only
    reals_per_slot: int = 2  # CKKS only: 2 packs two reals into one complex slot
    encryption: str = "symmetric"  # "symmetric" (seeded, secret key) or "public-key"


def _scheme_type(scheme: str):
    if scheme == "ckks":
        return seal.SCHEME_TYPE.CKKS
    if scheme == "bfv":
        return seal.SCHEME_TYPE.BFV
    raise ValueError(f"scheme must be 'ckks' or 'bfv', got {scheme!r}")


@lru_cache(maxsize=32)
def coeff_modulus_values(poly_modulus_degree: int, bit_sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The primes SEAL picks for these bit sizes (deterministic: largest NTT-friendly primes)."""
    return tuple(m.value() for m in seal.CoeffModulus.Create(poly_modulus_degree, list(bit_sizes)))


@lru_cache(maxsize=32)
def plain_modulus_value(poly_modulus_degree: int, bits: int) -> int:
    """The batching-friendly prime SEAL picks for a BFV plain modulus of ``bits`` bits."""
    return seal.PlainModulus.Batching(poly_modulus_degree, bits).value()


def spec_fingerprint(spec: SealSpec) -> str:
    """Hex SHA-256 (first 16 bytes) of scheme, degree and the actual moduli."""
    moduli = coeff_modulus_values(spec.poly_modulus_degree, spec.coeff_mod_bit_sizes)
    plain = plain_modulus_value(spec.poly_modulus_degree, spec.plain_modulus_bits) if spec.scheme == "bfv" else 0
    text = f"{spec.scheme}|N={spec.poly_modulus_degree}|q={','.join(map(str, moduli))}|t={plain}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _parameters(spec: SealSpec):
    params = seal.EncryptionParameters(_scheme_type(spec.scheme))
    params.set_poly_modulus_degree(spec.poly_modulus_degree)
    params.set_coeff_modulus(seal.CoeffModulus.Create(spec.poly_modulus_degree, list(spec.coeff_mod_bit_sizes)))
    if spec.scheme == "bfv":
        params.set_plain_modulus(seal.PlainModulus.Batching(spec.poly_modulus_degree, spec.plain_modulus_bits))
    return params


def _context(params, *, what: str):
    """A SEALContext that enforces 128-bit security (HE standard tables)."""
    try:
        context = seal.SEALContext(params, True, seal.SEC_LEVEL_TYPE.TC128)
    except SEAL_ERRORS as exc:
        raise KeyMaterialError(f"{what}: SEAL refuses these parameters: {exc}") from None
    if not context.parameters_set():
        raise KeyMaterialError(f"{what}: SEAL refuses these parameters at 128-bit security: {context.parameters_error_message()}")
    return context


@lru_cache(maxsize=16)
def _shared_context(spec: SealSpec):
    params = _parameters(spec)
    return params, _context(params, what=f"{spec.scheme} N={spec.poly_modulus_degree}")


class SealEngine:
    """Encrypt, add and decrypt chunked vectors under one SEAL parameter set and key set.

    Built by :meth:`generate` (a key holder: fresh keys) or :meth:`from_blobs` (a client or the
    server, from the bytes of a context). Not thread-safe.
    """

    def __init__(self, spec: SealSpec, *, scale: float | None, secret_key=None, public_key=None) -> None:
        self.spec = spec
        self.scale = scale
        self._params, self._context = _shared_context(spec)
        self._secret_key = secret_key
        self._public_key = public_key
        self._evaluator = seal.Evaluator(self._context)
        self._first_parms_id = self._context.first_parms_id()
        if spec.scheme == "ckks":
            self._encoder = seal.CKKSEncoder(self._context)
            self.values_per_ciphertext = self._encoder.slot_count() * spec.reals_per_slot
        else:
            self._encoder = seal.BatchEncoder(self._context)
            self.values_per_ciphertext = self._encoder.slot_count()
            self.plain_modulus = plain_modulus_value(spec.poly_modulus_degree, spec.plain_modulus_bits)
        self._encryptor = None
        if spec.encryption == "symmetric" and secret_key is not None:
            self._encryptor = seal.Encryptor(self._context, secret_key)
        elif spec.encryption == "public-key" and public_key is not None:
            self._encryptor = seal.Encryptor(self._context, public_key)
        self._decryptor = seal.Decryptor(self._context, secret_key) if secret_key is not None else None

    # -- construction -------------------------------------------------------------------
    @classmethod
    def generate(cls, spec: SealSpec, *, scale: float | None) -> "SealEngine":
        """Fresh keys from SEAL's CSPRNG (never from a numpy generator)."""
        _params, context = _shared_context(spec)
        keygen = seal.KeyGenerator(context)
        secret_key = keygen.secret_key()
        public_key = None
        if spec.encryption == "public-key":
            public_key = seal.PublicKey()
            keygen.create_public_key(public_key)
        return cls(spec, scale=scale, secret_key=secret_key, public_key=public_key)

    @classmethod
    def from_blobs(cls, spec: SealSpec, blobs: Mapping[str, bytes], *, scale: float | None, what: str) -> "SealEngine":
        """Rebuild from context blobs: ``params`` always, ``secret_key``/``public_key`` if present.

        Raises:
            KeyMaterialError: the parameters differ from ``spec`` or are not 128-bit secure.
            ProtocolError: a key blob that SEAL cannot parse.
        """
        params_blob = blobs.get("params")
        if params_blob is None:
            raise ProtocolError(f"{what} carries no 'params' blob")
        check_seal_blob(params_blob, what=f"{what} (parameters)")
        params = seal.EncryptionParameters(_scheme_type(spec.scheme))
        try:
            _SCRATCH.load(_ParamsLoader(params), None, params_blob)
        except SEAL_ERRORS as exc:
            raise ProtocolError(f"{what}: SEAL cannot parse the parameters: {exc}") from None
        shipped = _describe_params(params)
        expected = _describe_params(_parameters(spec))
        if shipped != expected:
            raise KeyMaterialError(f"{what}: its parameters {shipped} differ from the preset's {expected}")
        _params, context = _shared_context(spec)
        secret_key = public_key = None
        if "secret_key" in blobs:
            secret_key = seal.SecretKey()
            cls._load(secret_key, context, blobs["secret_key"], what=f"{what} (secret key)")
        if "public_key" in blobs:
            public_key = seal.PublicKey()
            cls._load(public_key, context, blobs["public_key"], what=f"{what} (public key)")
        return cls(spec, scale=scale, secret_key=secret_key, public_key=public_key)

    @staticmethod
    def _load(obj, context, blob: bytes, *, what: str) -> None:
        check_seal_blob(blob, what=what)
        try:
            _SCRATCH.load(obj, context, blob)
        except SEAL_ERRORS as exc:
            raise ProtocolError(f"{what}: SEAL rejects the bytes ({exc})") from None

    # -- what this engine can do ------------------------------------------------------------
    @property
    def holds_secret_key(self) -> bool:
        return self._secret_key is not None

    @property
    def can_encrypt(self) -> bool:
        return self._encryptor is not None

    def export(self, *, secret_key: bool, public_key: bool) -> dict[str, bytes]:
        """Blobs for a context message; the secret key only when ``secret_key=True``."""
        blobs = {"params": _SCRATCH.dump(self._params)}
        if secret_key:
            if self._secret_key is None:
                raise KeyMaterialError("this engine holds no secret key to export")
            blobs["secret_key"] = _SCRATCH.dump(self._secret_key)
        if public_key and self._public_key is not None:
            blobs["public_key"] = _SCRATCH.dump(self._public_key)
        return blobs

    # -- client side --------------------------------------------------------------------------
    def encrypt(self, plain: np.ndarray) -> list[bytes]:
        """Encrypt a vector whose length is a multiple of ``values_per_ciphertext``.

        ``plain`` is float64 for CKKS, int64 in (-t/2, t/2) for BFV. Symmetric presets produce
        seeded ciphertexts (second polynomial replaced by its seed).
        """
        if self._encryptor is None:
            raise KeyMaterialError("this context holds neither the secret key nor a public key: it cannot encrypt")
        per = self.values_per_ciphertext
        rows = plain.reshape(-1, per)
        blobs = []
        for row in rows:
            pt = seal.Plaintext()
            if self.spec.scheme == "ckks":
                values = row.view(np.complex128) if self.spec.reals_per_slot == 2 else row
                self._encoder.encode(values.tolist(), self.scale, pt)
            else:
                self._encoder.encode(np.mod(row, self.plain_modulus).tolist(), pt)
            if self.spec.encryption == "symmetric":
                blobs.append(_SCRATCH.dump(self._encryptor.encrypt_symmetric(pt)))
            else:
                ct = seal.Ciphertext()
                self._encryptor.encrypt(pt, ct)
                blobs.append(_SCRATCH.dump(ct))
        return blobs

    # -- server side ----------------------------------------------------------------------------
    def load_ciphertext(self, blob: bytes, *, what: str):
        """Parse and check one ciphertext: level, size, NTT form and (CKKS) scale.

        Raises:
            ProtocolError: bytes SEAL rejects, or a ciphertext that does not fit this context.
        """
        check_seal_blob(blob, what=what)
        ct = seal.Ciphertext()
        try:
            _SCRATCH.load(ct, self._context, blob)
        except SEAL_ERRORS as exc:
            raise ProtocolError(f"{what}: SEAL rejects the bytes ({exc}); tampered, or made under other parameters") from None
        if ct.parms_id() != self._first_parms_id:
            raise ProtocolError(f"{what}: ciphertext is at another modulus level than fresh ciphertexts")
        if ct.size() != 2:
            raise ProtocolError(f"{what}: ciphertext has {ct.size()} polynomials, a fresh one has 2")
        if ct.is_ntt_form() != (self.spec.scheme == "ckks"):
            raise ProtocolError(f"{what}: ciphertext is in the wrong (NTT) form for {self.spec.scheme}")
        if self.spec.scheme == "ckks" and ct.scale != self.scale:
            raise ProtocolError(f"{what}: ciphertext scale {ct.scale!r} differs from the context's {self.scale!r}")
        return ct

    def accumulate(self, acc: list | None, blobs: Sequence[bytes], *, what: str) -> list:
        """Add one client's ciphertexts into ``acc`` (a new list when ``acc`` is None)."""
        loaded = [self.load_ciphertext(b, what=f"{what}, ciphertext {i}") for i, b in enumerate(blobs)]
        if acc is None:
            return loaded
        if len(acc) != len(loaded):
            raise ProtocolError(f"{what}: {len(loaded)} ciphertexts, the others sent {len(acc)}")
        for total, ct in zip(acc, loaded):
            self._evaluator.add_inplace(total, ct)
        return acc

    def dump(self, acc: Sequence) -> list[bytes]:
        return [_SCRATCH.dump(ct) for ct in acc]

    # -- key holder side --------------------------------------------------------------------------
    def decrypt(self, blobs: Sequence[bytes], *, what: str) -> np.ndarray:
        """Decrypt an aggregate: float64 (CKKS, both reals of each slot) or int64 (BFV, centred)."""
        if self._decryptor is None:
            raise KeyMaterialError(f"{what}: this party holds no secret key and cannot decrypt")
        out = []
        for i, blob in enumerate(blobs):
            ct = self.load_ciphertext(blob, what=f"{what}, ciphertext {i}")
            pt = seal.Plaintext()
            self._decryptor.decrypt(ct, pt)
            if self.spec.scheme == "ckks":
                if self.spec.reals_per_slot == 2:
                    out.append(np.asarray(self._encoder.decode_complex(pt), dtype=np.complex128).view(np.float64))
                else:
                    out.append(np.asarray(self._encoder.decode_double(pt), dtype=np.float64))
            else:
                out.append(np.asarray(self._encoder.decode_int64(pt), dtype=np.int64))
        if not out:
            return np.zeros(0, dtype=np.float64 if self.spec.scheme == "ckks" else np.int64)
        return np.concatenate(out)


class _ParamsLoader:
    """Adapter: EncryptionParameters.load takes no context argument."""

    def __init__(self, params) -> None:
        self._params = params

    def load(self, _context, path: str) -> None:
        self._params.load(path)


def _describe_params(params) -> dict[str, object]:
    names = {seal.SCHEME_TYPE.CKKS: "ckks", seal.SCHEME_TYPE.BFV: "bfv"}
    scheme = params.scheme()
    desc: dict[str, object] = {
        "scheme": names.get(scheme, str(scheme)),
        "N": params.poly_modulus_degree(),
        "q": [m.value() for m in params.coeff_modulus()],
    }
    if desc["scheme"] == "bfv":
        desc["t"] = params.plain_modulus().value()
    return desc


def new_key_id() -> str:
    """A random label for one key set (not a secret: it lets parties spot mixed-up key sets)."""
    return secrets.token_hex(16)
