"""The SecAgg / SecAgg+ state machines: exact sums under dropouts, refusals, tampering."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from secagg import DropoutError, ProtocolError, Stage, drive_round
from secagg import _primitives as prim
from secagg.graph import neighbours, round_completes
from secagg.messages import (
    HEADER_BYTES,
    KeyAdvertisement,
    KeyList,
    MaskedInput,
    SealedShare,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
    decode_message,
)
from secagg.protocol import SecAggClient, SecAggClientSession, SecAggServer, SecAggServerSession, secure_sum_integers

STAGES = list(Stage)


def _vectors(n: int, d: int, seed: int, bits: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dtype = np.uint32 if bits == 32 else np.uint64
    return {f"c{i:02d}": rng.integers(0, np.iinfo(dtype).max, d, dtype=dtype, endpoint=True) for i in range(n)}


def _ring_sum(vectors, ids, bits=32):
    dtype = np.uint32 if bits == 32 else np.uint64
    total = np.zeros(next(iter(vectors.values())).size, dtype)
    for cid in ids:
        total += vectors[cid]
    return total


# ----------------------------------------------------------------------------- exact sums


def _keys(ids):
    return {c: prim.new_identity_key() for c in ids}


def _run(vectors, *, threshold, degree=None, dropouts=None, signed=False, bits=32):
    """One round through the sessions; returns (result or the DropoutError, the server state machine)."""
    ids = sorted(vectors)
    n = len(ids)
    keys = _keys(ids) if signed else {}
    pki = {c: prim.identity_public_raw(k) for c, k in keys.items()} if signed else None
    server = SecAggServer(
        round_index=3,
        participants=ids,
        threshold=threshold,
        degree=n - 1 if degree is None else degree,
        bits=bits,
        length=next(iter(vectors.values())).size,
        identities=pki,
    )
    parties = {}
    for c in ids:
        session = SecAggClientSession(SecAggClient(c, round_index=3, identity_key=keys.get(c), identity_keys=pki))
        session.set_words(vectors[c])
        parties[c] = session.handle
    try:
        return drive_round(SecAggServerSession(server), parties, dropouts=dropouts), server
    except DropoutError as exc:
        return exc, server


def _oracle(server, ids, threshold, dropouts, signed):
    """round_completes on the graph the server actually derived (None before the advertisements closed)."""
    try:
        nbrs = [tuple(ids.index(p) for p in server.neighbours_of(c)) for c in ids]
    except ProtocolError:
        return None
    return round_completes(nbrs, threshold=threshold, silent_from={ids.index(c): s for c, s in dropouts.items()}, signed=signed)


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 9),
    d=st.integers(1, 33),
    bits=st.sampled_from([32, 64]),
    signed=st.booleans(),
    data=st.data(),
)
def test_complete_graph_sum_is_exact_under_any_dropouts(n, d, bits, signed, data):
    vectors = _vectors(n, d, seed=n * 100 + d, bits=bits)
    ids = sorted(vectors)
    t = data.draw(st.integers(1, n), label="threshold")
    dropouts = data.draw(st.dictionaries(st.sampled_from(ids), st.sampled_from(STAGES), max_size=n), label="dropouts")
    # in the complete graph the rules do not depend on the graph seed
    expected_ok = round_completes(
        neighbours(n, degree=n - 1, seed=bytes(32)),
        threshold=t,
        silent_from={ids.index(c): s for c, s in dropouts.items()},
        signed=signed,
    )
    result, _ = _run(vectors, threshold=t, dropouts=dropouts, signed=signed, bits=bits)
    if expected_ok:
        counted = [c for c in ids if dropouts.get(c, Stage.UNMASK) > Stage.MASKED_INPUT]
        assert result.contributors == tuple(counted)
        assert result.dropped == tuple(sorted(dropouts))
        assert np.array_equal(result.total, _ring_sum(vectors, counted, bits))
    else:
        assert isinstance(result, DropoutError) and f"threshold={t}" in str(result)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(5, 16), d=st.integers(1, 17), signed=st.booleans(), data=st.data())
def test_secagg_plus_sum_is_exact_and_completion_follows_the_rules(n, d, signed, data):
    """Exact sums under random dropouts at every stage, the consistency check included."""
    vectors = _vectors(n, d, seed=n * 7 + d)
    ids = sorted(vectors)
    k = data.draw(st.sampled_from([k for k in (2, 4, 6) if k < n - 1]), label="degree")
    t = data.draw(st.integers(1, k + 1), label="threshold")
    dropouts = data.draw(st.dictionaries(st.sampled_from(ids), st.sampled_from(STAGES), max_size=n // 2), label="dropouts")
    result, server = _run(vectors, threshold=t, degree=k, dropouts=dropouts, signed=signed)
    expected_ok = _oracle(server, ids, t, dropouts, signed)
    if isinstance(result, DropoutError):
        assert not expected_ok  # None: fewer than t advertised, the graph was never derived
    else:
        assert expected_ok
        assert set(result.contributors) <= {c for c in ids if dropouts.get(c, Stage.UNMASK) > Stage.MASKED_INPUT}
        assert set(dropouts) <= set(result.dropped)
        assert np.array_equal(result.total, _ring_sum(vectors, result.contributors))


def test_below_threshold_fails_clearly_and_reveals_nothing():
    vectors = _vectors(6, 8, seed=1)
    ids = sorted(vectors)
    h = _Harness(vectors, threshold=4)
    h.advertise()
    h.share()
    h.masked()
    requests = h.server.unmask_requests()
    for cid in ids[:3]:  # only 3 of 6 answer: every secret has 3 < 4 shares
        h.server.receive_unmask(h.clients[cid].unmask(requests[cid]))
    with pytest.raises(DropoutError, match=r"only \[3\] good shares arrived.*threshold=4.*no secret was rebuilt"):
        h.server.finish()
    # the server's state still holds only the masked sum, which is far from the true sum
    masked_sum = h.server._sum
    assert not np.array_equal(masked_sum, _ring_sum(vectors, ids))
    with pytest.raises(ProtocolError, match="finished"):
        h.server.finish()


def test_dropout_error_before_any_share_is_requested():
    vectors = _vectors(5, 4, seed=2)
    with pytest.raises(DropoutError, match="MASKED_INPUT.*before any secret was revealed"):
        secure_sum_integers(vectors, round_index=1, threshold=4, dropouts={"c00": Stage.MASKED_INPUT, "c01": Stage.MASKED_INPUT})


def test_client_with_too_few_sharing_holders_leaves_before_masking():
    """Masking with fewer than t holders would let the server isolate the input: the client leaves."""
    vectors = _vectors(8, 4, seed=3)
    h = _Harness(vectors, threshold=3, degree=2)
    h.advertise()
    victim = h.ids[0]
    nb = h.server.neighbours_of(victim)
    h.share(ids=[c for c in h.ids if c not in nb[:1]])  # one of its two neighbours never shares: 2 < 3 holders
    with pytest.raises(DropoutError, match=r"only 2 holders shared with it, fewer than threshold=3"):
        h.clients[victim].masked_input(h.deliveries[victim], vector=vectors[victim])
    assert h.clients[victim].stage is None  # it left: no later request is answered


# ----------------------------------------------------------------------------- a stepwise harness


class _Harness:
    def __init__(self, vectors, *, threshold, degree=None, round_index=5, signed=False):
        self.vectors = vectors
        self.ids = sorted(vectors)
        n = len(self.ids)
        self.round = round_index
        self.signed = signed
        self.keys = {c: prim.new_identity_key() for c in self.ids} if signed else {}
        pki = {c: prim.identity_public_raw(k) for c, k in self.keys.items()} if signed else None
        self.server = SecAggServer(
            round_index=round_index,
            participants=self.ids,
            threshold=threshold,
            degree=n - 1 if degree is None else degree,
            length=next(iter(vectors.values())).size,
            identities=pki,
        )
        self.clients = {
            c: SecAggClient(c, round_index=round_index, identity_key=self.keys.get(c), identity_keys=pki) for c in self.ids
        }

    def advertise(self, ids=None):
        setups = self.server.setup_messages()
        self.ads = {c: self.clients[c].advertise(setups[c]) for c in (ids or self.ids)}
        for msg in self.ads.values():
            self.server.receive_advertisement(msg)
        self.lists = self.server.key_lists()
        return self.lists

    def share(self, ids=None):
        self.bundles = {c: self.clients[c].share_keys(self.lists[c]) for c in (ids or self.lists)}
        for msg in self.bundles.values():
            self.server.receive_shares(msg)
        self.deliveries = self.server.share_deliveries()
        return self.deliveries

    def masked(self, ids=None):
        for c in ids or self.deliveries:
            self.server.receive_masked_input(self.clients[c].masked_input(self.deliveries[c], vector=self.vectors[c]))

    def requests(self):
        if self.signed:
            sets = self.server.survivor_sets()
            for c, msg in sets.items():
                self.server.receive_survivor_signature(self.clients[c].consistency_check(msg))
        return self.server.unmask_requests()

    def finish(self):
        for c, msg in self.requests().items():
            self.server.receive_unmask(self.clients[c].unmask(msg))
        return self.server.finish()


def test_harness_round_is_exact():
    vectors = _vectors(5, 10, seed=4)
    h = _Harness(vectors, threshold=3)
    h.advertise()
    h.share()
    h.masked()
    assert np.array_equal(h.finish(), _ring_sum(vectors, h.ids))


# ----------------------------------------------------------------------------- tampering


def _flip(data: bytes, pos: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 0x01
    return bytes(out)


def test_tampered_share_ciphertext_is_rejected():
    h = _Harness(_vectors(4, 3, seed=5), threshold=2)
    h.advertise()
    deliveries = h.share()
    msg = ShareDelivery.from_bytes(deliveries["c00"])
    entry = msg.shares[0]
    bad = ShareDelivery(msg.round_index, msg.recipient, (SealedShare(entry.peer, _flip(entry.blob, 20)),) + msg.shares[1:])
    with pytest.raises(ProtocolError, match="authentication"):
        h.clients["c00"].masked_input(bad.to_bytes(), vector=h.vectors["c00"])


def test_swapped_share_is_rejected():
    """A share sealed for c01 delivered to c02 (relabelled as if addressed there) fails."""
    h = _Harness(_vectors(4, 3, seed=6), threshold=2)
    h.advertise()
    deliveries = h.share()
    to_c01 = ShareDelivery.from_bytes(deliveries["c01"])
    to_c02 = ShareDelivery.from_bytes(deliveries["c02"])
    from_c00_for_c01 = next(e for e in to_c01.shares if e.peer == "c00")
    swapped = tuple(from_c00_for_c01 if e.peer == "c00" else e for e in to_c02.shares)
    with pytest.raises(ProtocolError, match="authentication"):
        h.clients["c02"].masked_input(ShareDelivery(to_c02.round_index, "c02", swapped).to_bytes(), vector=h.vectors["c02"])
    # and a whole delivery sent to the wrong client
    with pytest.raises(ProtocolError, match="delivered to 'c03'"):
        h.clients["c03"].masked_input(deliveries["c02"], vector=h.vectors["c03"])


def test_sender_swap_inside_a_delivery_is_rejected():
    h = _Harness(_vectors(4, 3, seed=7), threshold=2)
    h.advertise()
    deliveries = h.share()
    msg = ShareDelivery.from_bytes(deliveries["c00"])
    a, b = msg.shares[0], msg.shares[1]
    relabelled = (SealedShare(b.peer, a.blob), SealedShare(a.peer, b.blob)) + msg.shares[2:]
    with pytest.raises(ProtocolError):
        h.clients["c00"].masked_input(ShareDelivery(msg.round_index, "c00", relabelled).to_bytes(), vector=h.vectors["c00"])


def test_replayed_messages_from_an_older_round_are_rejected():
    vectors = _vectors(4, 3, seed=8)
    old = _Harness(vectors, threshold=2, round_index=5)
    old.advertise()
    old_deliveries = old.share()
    new = _Harness(vectors, threshold=2, round_index=6)
    with pytest.raises(ProtocolError, match="round 6, setup is for round 5"):
        new.clients["c00"].advertise(old.server.setup.to_bytes())
    new.advertise()
    with pytest.raises(ProtocolError, match="round 6, message is for round 5"):
        new.clients["c00"].share_keys(old.lists["c00"])
    new.share()
    with pytest.raises(ProtocolError, match="round 6, message is for round 5"):
        new.clients["c00"].masked_input(old_deliveries["c00"], vector=vectors["c00"])
    # an old sealed share re-wrapped in a new-round delivery still fails (keys and AAD bind the round)
    fresh = ShareDelivery.from_bytes(new.deliveries["c00"])
    stale = ShareDelivery.from_bytes(old_deliveries["c00"])
    mixed = ShareDelivery(6, "c00", (stale.shares[0],) + fresh.shares[1:])
    with pytest.raises(ProtocolError, match="authentication"):
        new.clients["c00"].masked_input(mixed.to_bytes(), vector=vectors["c00"])
    # and the server refuses an old-round masked input
    stale_input = MaskedInput(5, "c01", 32, 3, bytes(12)).to_bytes()
    with pytest.raises(ProtocolError, match="round 5"):
        new.server.receive_masked_input(stale_input)


def _all_messages():
    h = _Harness(_vectors(4, 5, seed=9), threshold=2, signed=True)
    out = {"round_setup": h.server.setup_messages()["c00"]}
    h.advertise()
    out["key_advertisement"] = h.ads["c00"]
    out["key_list"] = h.lists["c00"]
    h.share()
    out["share_bundle"] = h.bundles["c00"]
    out["share_delivery"] = h.deliveries["c00"]
    masked = h.clients["c00"].masked_input(h.deliveries["c00"], vector=h.vectors["c00"])
    out["masked_input"] = bytes(masked)
    h.server.receive_masked_input(masked)
    h.masked(ids=["c01", "c02", "c03"])
    sets = h.server.survivor_sets()
    out["survivor_set"] = sets["c00"]
    for c, msg in sets.items():
        sig = h.clients[c].consistency_check(msg)
        out.setdefault("survivor_signature", sig)
        h.server.receive_survivor_signature(sig)
    requests = h.server.unmask_requests()
    out["unmask_request"] = requests["c00"]
    out["unmask_response"] = h.clients["c00"].unmask(requests["c00"])
    return out


MESSAGES = _all_messages()


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_every_message_round_trips_and_truncation_is_rejected(kind):
    data = MESSAGES[kind]
    msg = decode_message(data)
    assert type(msg).kind.label == kind
    assert msg.to_bytes() == data
    for cut in sorted({0, 1, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 1, len(data) // 2, len(data) - 1}):
        with pytest.raises(ProtocolError):
            decode_message(data[:cut])
    with pytest.raises(ProtocolError, match="trailing"):
        decode_message(data + b"\x00")


@pytest.mark.parametrize("kind", sorted(MESSAGES))
@pytest.mark.parametrize("pos, pattern", [(0, "magic"), (2, "version"), (3, "expected a")])
def test_header_tampering_is_rejected(kind, pos, pattern):
    """Receivers parse with the type their state expects, so a flipped kind byte is caught too."""
    expected_type = type(decode_message(MESSAGES[kind]))
    with pytest.raises(ProtocolError, match=pattern):
        expected_type.from_bytes(_flip(MESSAGES[kind], pos))


def test_round_field_tampering_is_rejected_by_every_receiver_without_changing_state():
    """A message whose round bytes changed is a replay: each receiver refuses it, then goes on."""
    vectors = _vectors(4, 5, seed=18)
    h = _Harness(vectors, threshold=2)

    def bad(data) -> bytes:
        return _flip(bytes(data), HEADER_BYTES - 1)  # round 5 -> 4

    def refused(fn, data, **kw):
        with pytest.raises(ProtocolError, match="round"):
            fn(bad(data), **kw)

    setups = h.server.setup_messages()
    refused(h.clients["c00"].advertise, setups["c00"])
    ads = {c: h.clients[c].advertise(setups[c]) for c in h.ids}
    refused(h.server.receive_advertisement, ads["c00"])
    for m in ads.values():
        h.server.receive_advertisement(m)
    lists = h.server.key_lists()
    refused(h.clients["c00"].share_keys, lists["c00"])
    bundles = {c: h.clients[c].share_keys(lists[c]) for c in h.ids}
    refused(h.server.receive_shares, bundles["c00"])
    for m in bundles.values():
        h.server.receive_shares(m)
    deliveries = h.server.share_deliveries()
    refused(h.clients["c00"].masked_input, deliveries["c00"], vector=vectors["c00"])
    inputs = {c: h.clients[c].masked_input(deliveries[c], vector=vectors[c]) for c in h.ids}
    refused(h.server.receive_masked_input, inputs["c00"])
    for m in inputs.values():
        h.server.receive_masked_input(m)
    requests = h.server.unmask_requests()
    refused(h.clients["c00"].unmask, requests["c00"])
    responses = {c: h.clients[c].unmask(requests[c]) for c in h.ids}
    refused(h.server.receive_unmask, responses["c00"])
    for m in responses.values():
        h.server.receive_unmask(m)
    assert np.array_equal(h.server.finish(), _ring_sum(vectors, h.ids))


def test_wrong_kind_is_rejected_by_typed_parsers():
    with pytest.raises(ProtocolError, match="expected a KEY_LIST message, got SHARE_DELIVERY"):
        KeyList.from_bytes(MESSAGES["share_delivery"])


def test_non_bytes_and_huge_counts_are_rejected():
    with pytest.raises(ProtocolError):
        decode_message("text")  # type: ignore[arg-type]
    data = bytearray(MESSAGES["unmask_request"])
    # recipient str: 2 + 3 bytes after the header, then the alive count: make it enormous
    data[HEADER_BYTES + 5 : HEADER_BYTES + 9] = (2**32 - 1).to_bytes(4, "big")
    with pytest.raises(ProtocolError, match="cannot fit"):
        decode_message(bytes(data))


# ----------------------------------------------------------------------------- unmask refusals


def _at_unmask(n=5, t=3, signed=False):
    h = _Harness(_vectors(n, 4, seed=10), threshold=t, signed=signed)
    h.advertise()
    h.share()
    h.masked()
    requests = h.requests()
    return h, requests


@pytest.mark.parametrize(
    "alive, pattern",
    [
        (("c01", "c02", "c03", "c04"), "does not list client 'c00' as alive"),
        (("c00", "c01", "zz"), "non-participants"),
        (("c00", "c01"), "lists 2 holders of client 'c00' alive, fewer than threshold=3"),
        (("c00", "c01", "c01", "c02"), "once, in participant order"),
        (("c00", "c02", "c01"), "once, in participant order"),
    ],
)
def test_malformed_unmask_requests_are_refused(alive, pattern):
    h, _ = _at_unmask()
    with pytest.raises(ProtocolError, match=pattern):
        h.clients["c00"].unmask(UnmaskRequest(h.round, "c00", alive).to_bytes())
    # a refused request did not consume the client's single answer
    h.clients["c00"].unmask(UnmaskRequest(h.round, "c00", tuple(h.ids)).to_bytes())


def test_second_unmask_request_is_refused():
    """Asking again with the peer moved to 'dropped' would reveal its second secret."""
    h, requests = _at_unmask()
    first = UnmaskResponse.from_bytes(h.clients["c00"].unmask(requests["c00"]))
    assert {o for o, _ in first.self_mask_shares} == set(h.ids) and not first.mask_key_shares
    second = UnmaskRequest(h.round, "c00", ("c00", "c01", "c02", "c04"))
    with pytest.raises(ProtocolError, match="round finished"):
        h.clients["c00"].unmask(second.to_bytes())


def test_unmask_request_naming_a_peer_that_never_shared_is_refused():
    vectors = _vectors(5, 4, seed=11)
    h = _Harness(vectors, threshold=3)
    h.advertise()
    h.share(ids=["c00", "c01", "c02", "c03"])  # c04 never shared
    h.masked()
    with pytest.raises(ProtocolError, match=r"\['c04'\] that never shared"):
        h.clients["c00"].unmask(UnmaskRequest(h.round, "c00", ("c00", "c01", "c02", "c04")).to_bytes())
    # with c04 not listed, c00 answers, and reveals nothing of c04 (it holds none of its shares)
    resp = UnmaskResponse.from_bytes(h.clients["c00"].unmask(UnmaskRequest(h.round, "c00", ("c00", "c01", "c02")).to_bytes()))
    assert "c04" not in {o for o, _ in resp.self_mask_shares + resp.mask_key_shares}


@pytest.mark.parametrize("signed", [False, True])
def test_a_corrupted_share_costs_nothing_while_t_good_ones_remain_and_its_sender_is_named(signed):
    h, requests = _at_unmask(n=6, t=3, signed=signed)
    for c, msg in requests.items():
        data = h.clients[c].unmask(msg)
        if c == "c01":  # c01 sends a wrong share of c02's seed (a share among the t lowest x)
            resp = UnmaskResponse.from_bytes(data)
            forged = tuple((o, s[:-1] + bytes([s[-1] ^ 1]) if o == "c02" else s) for o, s in resp.self_mask_shares)
            data = UnmaskResponse(resp.round_index, c, forged, resp.mask_key_shares).to_bytes()
            if signed:  # the sender signs what it sends: the server takes it, then finds the share bad
                from secagg.messages import sign_message

                data = sign_message(data, h.keys[c])
        h.server.receive_unmask(data)
    total = h.server.finish()
    assert np.array_equal(total, _ring_sum(h.vectors, h.ids))
    assert h.server.rejected_shares == {"c01": ("c02",)}


def test_too_many_corrupted_shares_fail_the_round_naming_the_senders():
    h, requests = _at_unmask(n=4, t=3)
    for c, msg in requests.items():
        data = h.clients[c].unmask(msg)
        if c in ("c01", "c02"):
            resp = UnmaskResponse.from_bytes(data)
            forged = tuple((o, bytes(66) if o == "c00" else s) for o, s in resp.self_mask_shares)
            data = UnmaskResponse(resp.round_index, c, forged, resp.mask_key_shares).to_bytes()
        h.server.receive_unmask(data)
    with pytest.raises(DropoutError, match=r"only \[2\] good shares.*\['c00'\].*'c01': \('c00',\), 'c02': \('c00',\)"):
        h.server.finish()


def test_server_rejects_out_of_protocol_messages():
    h = _Harness(_vectors(4, 3, seed=12), threshold=2)
    h.advertise()
    with pytest.raises(ProtocolError, match="second key advertisement|during stage SHARE_KEYS"):
        h.server.receive_advertisement(h.ads["c00"])
    bundle = h.clients["c00"].share_keys(h.lists["c00"])
    h.server.receive_shares(bundle)
    with pytest.raises(ProtocolError, match="second share bundle"):
        h.server.receive_shares(bundle)
    fake = KeyAdvertisement(5, "c09", bytes(32), bytes(32), bytes(32), bytes(32)).to_bytes()
    with pytest.raises(ProtocolError):
        h.server.receive_advertisement(fake)


def test_client_refuses_repeated_altered_and_withheld_advertisements():
    h = _Harness(_vectors(4, 3, seed=13), threshold=2)
    lists = h.advertise()
    kl = KeyList.from_bytes(lists["c00"])
    ads = kl.advertisements

    def refused(pattern, advertisements, roster=kl.roster):
        with pytest.raises(ProtocolError, match=pattern):
            h.clients["c00"].share_keys(KeyList(kl.round_index, "c00", roster, advertisements).to_bytes())

    refused("twice", (ads[0], ads[0]) + ads[1:])
    a = ads[1]
    same_key = KeyAdvertisement(a.round_index, a.sender, ads[0].enc_public, a.mask_public, a.commitment, a.setup_digest)
    refused("does not match its roster entry", (ads[0], same_key) + ads[2:])
    refused(r"withholds the advertisements of neighbours \['c03'\]", ads[:2])
    refused("does not hold the advertisement client 'c00' sent", ads, roster=tuple(e for e in kl.roster if e[0] != "c00"))
    # the same repeated key, made consistent with the roster, is still refused
    forged_roster = tuple((c, same_key.digest() if c == a.sender else d) for c, d in kl.roster)
    refused("repeats a public key", (ads[0], same_key) + ads[2:], roster=forged_roster)


# ----------------------------------------------------------------------------- signed keys


def test_signed_round_completes():
    vectors = _vectors(5, 6, seed=14)
    h = _Harness(vectors, threshold=3, signed=True)
    h.advertise()
    h.share()
    h.masked()
    assert np.array_equal(h.finish(), _ring_sum(vectors, h.ids))


def test_signed_keys_detect_a_substituting_server():
    """An active server replaces c01's mask key by its own (roster made to match): unsigned clients cannot tell, signed ones refuse."""
    for signed in (False, True):
        h = _Harness(_vectors(4, 3, seed=15), threshold=2, signed=signed)
        lists = h.advertise()
        kl = KeyList.from_bytes(lists["c00"])
        _, attacker_pk = prim.new_x25519()
        forged = tuple(
            KeyAdvertisement(a.round_index, a.sender, a.enc_public, attacker_pk, a.commitment, a.setup_digest, a.signature)
            if a.sender == "c01"
            else a
            for a in kl.advertisements
        )
        roster = tuple((c, next(a for a in forged if a.sender == c).digest() if c == "c01" else d) for c, d in kl.roster)
        msg = KeyList(kl.round_index, "c00", roster, forged).to_bytes()
        if signed:
            with pytest.raises(ProtocolError, match="signature is invalid"):
                h.clients["c00"].share_keys(msg)
        else:
            h.clients["c00"].share_keys(msg)  # accepted: why signed_keys exists


def test_signing_client_refuses_a_downgraded_round():
    vectors = _vectors(3, 2, seed=16)
    unsigned_server = SecAggServer(round_index=1, participants=sorted(vectors), threshold=2, degree=2, length=2)
    key = prim.new_identity_key()
    client = SecAggClient("c00", round_index=1, identity_key=key, identity_keys={"c00": prim.identity_public_raw(key)})
    with pytest.raises(ProtocolError, match="requires signed key advertisement"):
        client.advertise(unsigned_server.setup_messages()["c00"])


# ----------------------------------------------------------------------------- what the server sees


def test_masked_vector_is_uniform_chi_square():
    d = 1 << 16
    vectors = {f"c{i}": np.zeros(d, np.uint32) for i in range(3)}  # all-zero inputs: worst case for leakage
    vectors["c1"][:] = 12345
    result = secure_sum_integers(vectors, round_index=2, threshold=2, keep_masked=True)
    assert np.array_equal(result.total, np.full(d, 12345, np.uint32))
    for cid, view in result.masked_views.items():
        assert not np.array_equal(view, vectors[cid])
        top = (view >> 24).astype(np.int64)  # top byte: 256 bins
        low = (view & 0xFF).astype(np.int64)  # low byte: 256 bins
        for bins in (top, low):
            counts = np.bincount(bins, minlength=256)
            assert chisquare(counts).pvalue > 1e-6


def test_byte_counts_are_real_message_sizes():
    vectors = _vectors(4, 100, seed=17)
    result = secure_sum_integers(vectors, round_index=1, threshold=3)
    up, down = result.bytes_up, result.bytes_down
    assert set(up) == {"key_advertisement", "share_bundle", "masked_input", "unmask_response"}
    assert set(down) == {"round_setup", "key_list", "share_delivery", "unmask_request"}
    head = HEADER_BYTES + 2 + 3 + 1 + 8 + 1  # header, id "c00", bits, length, pad count
    per_input = head + (-head % 8) + 100 * 4 + 1  # zero padding to an 8-byte boundary, the payload, an empty trailer
    assert up["masked_input"] == 4 * per_input
    assert up["key_advertisement"] == 4 * (HEADER_BYTES + 2 + 3 + 4 * 32 + 1)
    signed = secure_sum_integers(vectors, round_index=1, threshold=3, identity_keys={c: prim.new_identity_key() for c in vectors})
    assert signed.bytes_up["masked_input"] == up["masked_input"] + 4 * 64
    assert set(signed.bytes_up) == set(up) | {"survivor_signature"} and "survivor_set" in signed.bytes_down


def test_more_clients_cannot_share_one_pairwise_mask():
    """Pairwise seeds of distinct pairs and rounds differ (no mask reuse across pairs or rounds)."""
    shared = b"\x07" * 32
    from secagg.protocol import _pairwise_seed, _self_seed

    seeds = {_pairwise_seed(shared, r, a, b) for r, (a, b) in itertools.product((1, 2), [("a", "b"), ("a", "c")])}
    seeds |= {_self_seed(shared, r, "a") for r in (1, 2)}
    assert len(seeds) == 6


def test_masked_payload_is_aligned_and_padding_is_checked():
    data = MESSAGES["masked_input"]
    msg = MaskedInput.from_bytes(data)
    offset = len(data) - len(msg.payload) - 1 - len(msg.signature)
    assert offset % 8 == 0
    assert np.frombuffer(msg.payload, dtype="<u4").flags.aligned
    bad = bytearray(data)
    bad[offset - 1] = 1  # a nonzero padding byte
    with pytest.raises(ProtocolError, match="padding"):
        MaskedInput.from_bytes(bytes(bad))


# ----------------------------------------------------------------------------- the consistency check


def _signed_at_consistency(n=5, t=3):
    h = _Harness(_vectors(n, 4, seed=19), threshold=t, signed=True)
    h.advertise()
    h.share()
    h.masked()
    return h, h.server.survivor_sets()


def test_survivor_sets_a_client_refuses_to_sign():
    h, sets = _signed_at_consistency()
    from secagg.messages import SurvivorSet

    for alive, pattern in [
        (("c01", "c02", "c03", "c04"), "does not list client 'c00' as alive"),
        (("c00", "c01"), "lists 2 holders of client 'c00' alive, fewer than threshold=3"),
        (("c00", "c01", "c02", "zz"), "non-participants"),
    ]:
        with pytest.raises(ProtocolError, match=pattern):
            h.clients["c00"].consistency_check(SurvivorSet(h.round, "c00", alive).to_bytes())
    h.clients["c00"].consistency_check(sets["c00"])
    with pytest.raises(ProtocolError, match="while expecting UNMASK"):  # it signs one set only
        h.clients["c00"].consistency_check(sets["c00"])


def test_unmask_requests_a_signed_client_refuses():
    h, sets = _signed_at_consistency()
    for c, msg in sets.items():
        h.server.receive_survivor_signature(h.clients[c].consistency_check(msg))
    honest = UnmaskRequest.from_bytes(h.server.unmask_requests()["c00"])
    client = h.clients["c00"]
    flipped = tuple((s, sig[:-1] + bytes([sig[-1] ^ 1]) if s == "c01" else sig) for s, sig in honest.signatures)
    cases = [
        (UnmaskRequest(h.round, "c00", honest.alive, flipped), "survivor set of 'c01' signature is invalid"),
        (UnmaskRequest(h.round, "c00", honest.alive, honest.signatures[:1]), "only 2 holders of client 'c00' confirmed"),
        (UnmaskRequest(h.round, "c00", honest.alive[:-1], honest.signatures), "the survivor set it signed says"),
        (UnmaskRequest(h.round, "c00", honest.alive, honest.signatures + honest.signatures[:1]), "twice"),
    ]
    for request, pattern in cases:
        with pytest.raises(ProtocolError, match=pattern):
            client.unmask(request.to_bytes())
    UnmaskResponse.from_bytes(client.unmask(honest.to_bytes()))  # the refusals did not use up its answer


def test_a_signature_over_another_survivor_set_is_refused_by_the_server():
    h, sets = _signed_at_consistency()
    from secagg.messages import SurvivorSet

    other = h.clients["c00"].consistency_check(SurvivorSet(h.round, "c00", ("c00", "c01", "c02", "c03")).to_bytes())
    with pytest.raises(ProtocolError, match="over another survivor set"):
        h.server.receive_survivor_signature(other)
