"""The Li-Micciancio key recovery (EUROCRYPT 2021), played by a passive server against CKKS rounds.

The server holds the aggregate ciphertext (c0, c1) it computed and receives the key holder's
decrypted sum z. Re-encoding z gives the plaintext polynomial p; if z is the raw decryption,
p = c0 + c1 * s exactly, so s = (p - c0) / c1, pointwise in SEAL's NTT representation (one
prime). The recovered candidate then decrypts any client's ciphertext of the round. The key
holder releases instead the exact sum of the clients' grid-rounded inputs, which the same
computation turns into a candidate that decrypts nothing.

Preset: ``compact`` (N = 4096, one prime), the smallest the library offers; ``compact-pk`` too.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import tenseal.sealapi as seal
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import KEY_HOLDER, CKKSSum, ClientKeys, ProtocolError, drive_round
from secagg import _he_wire as wire
from secagg._he_core import ckks_error_bound, snap_to_grid
from secagg._he_seal import _SCRATCH, _SEAL_HEADER, _shared_context
from secagg.ckks import CKKSClient, HEServer

IDS = ("a", "b", "c")


class _Round:
    """One round run through the parties' sessions, with everything the server saw recorded."""

    def __init__(self, preset: str, d: int) -> None:
        backend = CKKSSum(value_bound=1.0, max_clients=5, preset=preset)
        self.holder = backend.key_holder_session(round_index=1)
        rng = np.random.default_rng(0)
        self.vectors = {cid: rng.uniform(-1, 1, d) for cid in IDS}
        server = backend.server_session(round_index=1, participants=IDS, length=d, public_context=self.holder.server_context())
        self.seen: dict[str, tuple[bytes, bytes]] = {}
        parties = {}
        for cid in IDS:
            session = backend.client_session(
                cid, round_index=1, participants=IDS, rng=rng, keys=ClientKeys(he_context=self.holder.client_context(cid))
            )
            session.set_input(self.vectors[cid])
            parties[cid] = self._spy(cid, session.handle)
        parties[KEY_HOLDER] = self._spy(KEY_HOLDER, self.holder.handle)
        self.result = drive_round(server, parties)
        info = self.holder.info
        self.n = info.poly_modulus_degree
        params, self.context = _shared_context(info.spec())
        self.q = params.coeff_modulus()[0].value()
        self.encoder = seal.CKKSEncoder(self.context)

    def _spy(self, name, respond):
        def spied(message):
            reply = respond(message)
            self.seen[name] = (message, reply)
            return reply

        return spied

    def ciphertext(self, message: bytes, index: int = 0):
        ct = seal.Ciphertext()
        _SCRATCH.load(ct, self.context, wire.unpack(message, what="m").blobs[index])
        data = ct.dyn_array()
        return ct, [data[j] for j in range(self.n)], [data[self.n + j] for j in range(self.n)]

    def released(self) -> np.ndarray:
        """What the key holder sent the server."""
        return np.frombuffer(wire.unpack(self.seen[KEY_HOLDER][1], what="m").blobs[0], dtype="<f8")

    def raw_decryption(self) -> np.ndarray:
        """The raw decryption, computed here with the key holder's secret key (a reference)."""
        engine = self.holder._holder._engine
        return engine.decrypt(wire.unpack(self.seen[KEY_HOLDER][0], what="m").blobs, what="aggregate")

    def recover_key(self, values: np.ndarray) -> list[int]:
        """Solve c0 + c1 * s = encode(values) for s, coefficient by coefficient in NTT form."""
        aggregate, c0, c1 = self.ciphertext(self.seen[KEY_HOLDER][0])
        plain = seal.Plaintext()
        self.encoder.encode(values[: self.n].view(np.complex128).tolist(), aggregate.scale, plain)
        p = plain.dyn_array()
        return [((p[j] - c0[j]) * pow(c1[j], -1, self.q)) % self.q for j in range(self.n)]

    def decrypt_with(self, key: list[int], cid: str) -> np.ndarray:
        """Decrypt client ``cid``'s first ciphertext under a candidate key."""
        ct, c0, c1 = self.ciphertext(self.seen[cid][1])
        m = [(c0[j] + c1[j] * key[j]) % self.q for j in range(self.n)]
        return self.encoder_decode(m, ct)

    def encoder_decode(self, coefficients: list[int], like) -> np.ndarray:
        # a SEAL Plaintext serialized uncompressed: parms_id, coeff_count, scale, then its DynArray
        head = _SEAL_HEADER.unpack_from(_SCRATCH.dump(seal.Plaintext()))
        array = struct.pack("<Q", self.n) + struct.pack(f"<{self.n}Q", *coefficients)
        array = _SEAL_HEADER.pack(head[0], head[1], head[2], head[3], 0, 0, 16 + len(array)) + array
        body = struct.pack("<4Q", *like.parms_id()) + struct.pack("<Q", self.n) + struct.pack("<d", like.scale) + array
        plain = seal.Plaintext()
        _SCRATCH.load(plain, self.context, _SEAL_HEADER.pack(head[0], head[1], head[2], head[3], 0, 0, 16 + len(body)) + body)
        return np.asarray(self.encoder.decode_complex(plain), dtype=np.complex128).view(np.float64)


@pytest.fixture(scope="module", params=["compact", "compact-pk"])
def played(request):
    return _Round(request.param, d=2 * 4096)


def test_attack_recovers_the_key_from_a_raw_decryption(played):
    """The attack code works: fed the raw decryption, it reads client 'a''s update."""
    key = played.recover_key(played.raw_decryption())
    read = played.decrypt_with(key, "a")
    assert np.max(np.abs(read - played.vectors["a"][:4096])) < 1e-6


def test_released_sum_does_not_yield_the_key(played):
    """What the key holder really releases: the candidate fails to decrypt a client's ciphertext."""
    key = played.recover_key(played.released())
    for cid in IDS:
        read = played.decrypt_with(key, cid)
        assert np.max(np.abs(read - played.vectors[cid][:4096])) > 1e-1


# -- why the release carries nothing about the key --------------------------------------------------
@pytest.mark.parametrize("preset", ["compact", "compact-pk", "compat"])
def test_release_is_the_exact_sum_of_the_grid_inputs_whatever_the_keys(preset):
    """Two rounds under independent keys and noise release bit-identical sums: the sum of the
    inputs rounded to the public grid, a function of the inputs alone (compat included)."""
    backend = CKKSSum(value_bound=1.0, max_clients=5, preset=preset)
    rng = np.random.default_rng(3)
    updates = {cid: rng.uniform(-1, 1, 5000) for cid in IDS}
    first = backend.aggregate(updates, round_index=1, rng=rng)
    second = backend.aggregate(updates, round_index=2, rng=rng)
    grid = backend.release_grid
    expected = sum(snap_to_grid(v, grid=grid, value_bound=1.0) for v in updates.values())
    assert np.array_equal(first.total, second.total)
    assert np.array_equal(first.total, expected)


@settings(max_examples=30, deadline=None)
@given(
    preset=st.sampled_from(["compact", "compact-pk", "compat"]),
    max_clients=st.integers(min_value=1, max_value=1000),
    value_bound=st.sampled_from([1e-3, 0.5, 1.0, 10.0]),
)
def test_grid_is_a_power_of_two_above_four_noise_radii(preset, max_clients, value_bound):
    backend = CKKSSum(value_bound=value_bound, max_clients=max_clients, preset=preset)
    p = backend.preset
    radius = ckks_error_bound(
        poly_modulus_degree=p.poly_modulus_degree,
        encryption=p.encryption,
        reals_per_slot=p.reals_per_slot,
        scale=backend.scale,
        value_bound=value_bound,
        count=max_clients,
    )
    grid = backend.release_grid
    assert grid > 4 * radius and math.log2(grid) == int(math.log2(grid))


def _compact_pk_grid() -> float:
    return CKKSSum(value_bound=1.0, max_clients=5, preset="compact-pk").release_grid


def _off_grid_round(offset: float):
    """Client 'c' skips the rounding (a client colluding with the server) and shifts coordinate 0."""
    backend = CKKSSum(value_bound=1.0, max_clients=5, preset="compact-pk")
    holder = backend.key_holder_session(round_index=1)
    grid = backend.release_grid
    updates = {cid: snap_to_grid(np.linspace(-0.9, 0.9, 64), grid=grid, value_bound=1.0) for cid in IDS}
    server = HEServer(holder.server_context(), round_index=1)
    for cid in IDS:
        client = CKKSClient(holder.client_context(cid), client_id=cid)
        vec = updates[cid].copy()
        if cid == "c":
            vec[0] += offset
            plain = client._padded(vec, np.float64)
            message = client._seal(plain, length=vec.size, weight=1.0, round_index=1)
        else:
            message = client.encrypt(vec, round_index=1)
        server.add(cid, message)
    return holder, server.result(), sum(updates.values()), grid


def test_an_off_grid_input_only_makes_the_key_holder_refuse():
    holder, aggregate, _exact, grid = _off_grid_round(offset=_compact_pk_grid() / 2)
    with pytest.raises(ProtocolError, match="away from the release grid.*nothing is released"):
        holder.handle(aggregate)
    # a shift within the noise radius changes nothing that is released
    holder, aggregate, exact, grid = _off_grid_round(offset=grid / 1000)
    released = np.frombuffer(wire.unpack(holder.handle(aggregate), what="m").blobs[0], dtype="<f8")
    assert np.array_equal(released, exact)
