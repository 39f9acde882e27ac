"""The private crypto layer: labels, AEAD failures, keystream accumulation."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secagg import ProtocolError
from secagg import _primitives as prim


def test_labels_are_domain_separated_and_unambiguous():
    labels = [prim.label(p, 1, "a") for p in prim.all_labels()]
    assert len(set(labels)) == len(labels)
    # length prefixes: ("ab", "c") and ("a", "bc") must not collide
    assert prim.context("ab", "c") != prim.context("a", "bc")
    assert prim.context(b"x") != prim.context("x")
    secret = os.urandom(32)
    assert prim.hkdf(secret, prim.LABEL_PAIRWISE_MASK, 1, "a", "b") != prim.hkdf(secret, prim.LABEL_PAIRWISE_MASK, 2, "a", "b")
    assert prim.hkdf(secret, prim.LABEL_PAIRWISE_MASK, 1, "a", "b") != prim.hkdf(secret, prim.LABEL_SELF_MASK, 1, "a", "b")


def test_keystream_is_aes256_ctr_keyed_with_the_full_seed():
    seed = os.urandom(32)
    ref = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(100))
    assert prim.keystream(seed, 100) == ref
    other = bytearray(seed)
    other[31] ^= 1  # the last byte matters: no truncation of the seed
    assert prim.keystream(bytes(other), 100) != ref


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("length", [1, 3, 65_536, 65_537, 200_003])
def test_add_keystreams_matches_whole_stream_arithmetic(dtype, length):
    seeds = [os.urandom(32) for _ in range(3)]
    signs = [1, -1, 1]
    base = np.random.default_rng(length).integers(0, np.iinfo(dtype).max, length, dtype=dtype, endpoint=True)
    acc = base.copy()
    prim.add_keystreams(acc, zip(seeds, signs))
    expect = base.copy()
    for seed, sign in zip(seeds, signs):
        ks = np.frombuffer(prim.keystream(seed, length * expect.itemsize), dtype=np.dtype(dtype).newbyteorder("<"))
        expect = expect + ks if sign > 0 else expect - ks
    assert np.array_equal(acc, expect)
    # fill_keystream gives the same words
    out = np.empty(length, dtype)
    prim.fill_keystream(seeds[0], out)
    assert np.array_equal(out, np.frombuffer(prim.keystream(seeds[0], out.nbytes), dtype=out.dtype))


def test_add_keystreams_rejects_bad_input():
    with pytest.raises(TypeError, match="uint32/uint64"):
        prim.add_keystreams(np.zeros(4, np.int32), [(os.urandom(32), 1)])
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        prim.add_keystreams(np.zeros(4, np.uint32), [(os.urandom(32), 2)])


def test_seal_binds_associated_data_and_key():
    key = os.urandom(32)
    blob = prim.seal(key, b"share", b"aad")
    assert prim.open_sealed(key, blob, b"aad") == b"share"
    assert prim.seal(key, b"share", b"aad")[:12] != blob[:12]  # fresh nonce every time
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    for k, b, a in [
        (key, bytes(tampered), b"aad"),
        (key, blob, b"other"),
        (os.urandom(32), blob, b"aad"),
        (key, blob[:20], b"aad"),
    ]:
        with pytest.raises(ProtocolError):
            prim.open_sealed(k, b, a)


def test_low_order_x25519_point_is_a_protocol_error():
    sk, _ = prim.new_x25519()
    with pytest.raises(ProtocolError, match="rejected"):
        prim.agree(sk, bytes(32))


def test_signatures_verify_and_reject():
    key = prim.new_identity_key()
    sig = prim.sign(key, b"m")
    prim.verify(prim.identity_public_raw(key), sig, b"m")
    with pytest.raises(ProtocolError, match="signature"):
        prim.verify(prim.identity_public_raw(key), sig, b"n")
