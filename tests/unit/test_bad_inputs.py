"""The bad-input catalogue (issue 9): one section per kind of bad input, each test with the exact error.

Kinds: NaN/Inf in an update; wrong length or dtype; an update from an unknown or duplicate client;
a message from an old round; truncated or oversized bytes; a wrong protocol version; a client
claiming an absurd number of examples; contexts or keys of the wrong kind; impossible configs.
A bad input fed to a federation must fail the round and leave every piece of server state as it was.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct

import numpy as np
import pytest

import dp
from fedcore import (
    ClientResult,
    ConfigError,
    DropoutSimulator,
    FedAdam,
    FedAvg,
    FedcoreError,
    Federation,
    FixedCountSampler,
    InProcessExecutor,
    PoissonSampler,
    RoundFailedError,
    TrainConfig,
    UpdatePipeline,
)
from fedcore.rounds.checkpoint import load_checkpoint
from fedcore.strategies.robust import Krum
from secagg import KeyMaterialError, MaskedSum, OverflowRiskError, PlaintextSum, ProtocolError, Stage
from secagg import _he_wire as wire
from secagg.bfv import BFVKeyHolder
from secagg.ckks import CKKSClient, CKKSKeyHolder, HEServer
from secagg.messages import KeyAdvertisement, KeyList, MaskedInput, decode_message
from secagg.protocol import SecAggClient, SecAggServer, secure_sum_integers

from .fedcore.toy import ToyTask, toy_clients

TRAIN = TrainConfig(lr=0.05, epochs=1, batch_size=8)
RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- helpers


class _Tamper:
    """An executor whose round results pass through ``edit`` (a client sending bad data)."""

    name = "tamper"

    def __init__(self, task, edit):
        self.inner = InProcessExecutor(task)
        self.workspace = self.inner.workspace
        self.edit = edit

    def fit(self, clients, **kwargs):
        kwargs.pop("progress", None)
        return self.edit(self.inner.fit(clients, **kwargs))

    def evaluate(self, clients, **kwargs):
        return self.inner.evaluate(clients, **kwargs)


def _replace(results, index, **fields):
    r = results[index]
    base = dict(client_id=r.client_id, update=r.update, num_examples=r.num_examples)
    base.update(fields)
    out = list(results)
    out[index] = ClientResult(**base)
    return out


def _federation(edit, tmp_path, **kwargs):
    task = ToyTask()
    defaults = dict(
        task=task, clients=toy_clients(4), strategy=FedAvg(), train=TRAIN, executor=_Tamper(task, edit), seed=7, reproducible=True,
        quiet=True, evaluate_every=0, ledger=dp.Ledger(), checkpoint_dir=tmp_path / "ckpt",
    )  # fmt: skip
    defaults.update(kwargs)
    return Federation(**defaults)


def _fails_and_changes_nothing(fed, error, pattern):
    """Run round 2 (round 1 was clean): it must fail with ``error`` and leave every piece of server state."""
    before = (fed.global_vector.copy(), fed.round_index, len(fed.ledger), len(fed.history))
    saved = (fed.checkpoint_dir / "state.json").read_text() if fed.checkpoint_dir else None
    with pytest.raises(error, match=pattern):
        fed.run_round()
    assert np.array_equal(fed.global_vector, before[0])
    assert (fed.round_index, len(fed.ledger), len(fed.history)) == before[1:]
    if saved is not None:
        assert (fed.checkpoint_dir / "state.json").read_text() == saved


class _BadFromRound2:
    """Round 1 is clean; from round 2 on the results pass through ``edit``."""

    def __init__(self, edit):
        self.edit = edit
        self.calls = 0

    def __call__(self, results):
        self.calls += 1
        return results if self.calls == 1 else self.edit(results)


def _tampered_federation(edit, tmp_path, **kwargs):
    fed = _federation(_BadFromRound2(edit), tmp_path, **kwargs)
    fed.run_round()
    return fed


def _masked_pipeline(weighting="uniform"):
    kwargs = {"max_examples": 100} if weighting == "examples" else {}
    return UpdatePipeline(backend=MaskedSum(value_bound=1.0, max_clients=4), clip=dp.L2Clip(1.0), weighting=weighting, **kwargs)


def _secagg_round(n=3, length=5, round_index=5):
    """Server and clients of a masked round, run up to the MASKED_INPUT stage."""
    ids = [f"c{i:02d}" for i in range(n)]
    server = SecAggServer(round_index=round_index, participants=ids, threshold=2, degree=n - 1, length=length)
    clients = {c: SecAggClient(c, round_index=round_index) for c in ids}
    setups = server.setup_messages()
    ads = {c: clients[c].advertise(setups[c]) for c in ids}
    for m in ads.values():
        server.receive_advertisement(m)
    lists = server.key_lists()
    for c in ids:
        server.receive_shares(clients[c].share_keys(lists[c]))
    deliveries = server.share_deliveries()
    return server, clients, deliveries, ads


def _reseal(body: bytes) -> bytes:
    """An edit made by someone who recomputes the (unkeyed) SHA-256 of an HE message."""
    return body + hashlib.sha256(body).digest()


@pytest.fixture(scope="module")
def ckks():
    holder = CKKSKeyHolder(value_bound=1.0, max_clients=4)
    ctx = holder.client_context(include_secret_key=True)
    ct = CKKSClient(ctx, client_id="c1").encrypt(np.array([0.1, 0.2]))
    return holder, ctx, ct


# ============================================================================= 1. NaN / Inf in an update


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_update_is_refused_by_every_backend(bad, ckks):
    vec = np.array([0.1, bad])
    message = re.escape("update of client 'a' holds NaN or Inf")
    with pytest.raises(ValueError, match=message):
        PlaintextSum().aggregate({"a": vec, "b": np.zeros(2)}, round_index=1, rng=RNG)
    with pytest.raises(ValueError, match=message):
        MaskedSum(value_bound=1.0, max_clients=4).aggregate(
            {"a": vec, "b": np.zeros(2), "c": np.zeros(2)}, round_index=1, rng=RNG
        )
    with pytest.raises(ValueError, match=message):
        CKKSClient(ckks[1], client_id="a").encrypt(vec)
    with pytest.raises(dp.DPValueError, match=re.escape("vec must be finite")):
        dp.L2Clip(1.0).clip(vec)


def test_dp_clip_counts_the_non_finite_coordinates():
    with pytest.raises(dp.DPValueError, match=re.escape("vec must be finite, got NaN or Inf in 1 coordinates")):
        dp.L2Clip(1.0).clip(np.array([0.1, np.nan, 0.2]))


def test_nan_update_fails_a_plaintext_round_and_changes_nothing(tmp_path):
    fed = _tampered_federation(lambda res: _replace(res, 1, update=np.full_like(res[1].update, np.nan)), tmp_path)
    _fails_and_changes_nothing(fed, (ValueError, RoundFailedError), re.escape("update of client 'client-1' holds NaN or Inf"))


def test_nan_update_fails_a_masked_round_naming_the_client(tmp_path):
    fed = _tampered_federation(lambda res: _replace(res, 1, update=np.full_like(res[1].update, np.nan)), tmp_path,
                               pipeline=_masked_pipeline())  # fmt: skip
    _fails_and_changes_nothing(fed, (ValueError, RoundFailedError), re.escape("update of client 'client-1' holds NaN or Inf"))


# ============================================================================= 2. wrong length or dtype


def test_wrong_length_is_refused_by_the_backends():
    with pytest.raises(ValueError, match=re.escape("update of client 'b' has length 4, expected 3 like the others")):
        PlaintextSum().aggregate({"a": np.zeros(3), "b": np.zeros(4)}, round_index=1, rng=RNG)
    with pytest.raises(ValueError, match=re.escape("update of client 'a' must be a non-empty 1-D vector, got shape (2, 2)")):
        PlaintextSum().aggregate({"a": np.zeros((2, 2))}, round_index=1, rng=RNG)
    server, clients, deliveries, _ = _secagg_round(length=5)
    with pytest.raises(ValueError, match=re.escape("vector of client 'c00' must have length 5, got shape (4,)")):
        clients["c00"].masked_input(deliveries["c00"], vector=np.zeros(4, dtype=np.uint32))


def test_wrong_length_ciphertext_is_refused_by_the_he_server(ckks):
    holder, ctx, ct = ckks
    server = HEServer(holder.public_context())
    server.add("c1", ct)
    longer = CKKSClient(ctx, client_id="c2").encrypt(np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ProtocolError, match=re.escape("ciphertext of client 'c2' has length 3, the others have 2")):
        server.add("c2", longer)


def test_wrong_dtype_is_refused_where_it_is_checked():
    with pytest.raises(TypeError, match=re.escape("update of client 'a' must be a numpy array, got list")):
        PlaintextSum().aggregate({"a": [0.1, 0.2]}, round_index=1, rng=RNG)  # type: ignore[dict-item]
    server, clients, deliveries, _ = _secagg_round(length=5)
    with pytest.raises(TypeError, match=re.escape("vector must hold 32-bit unsigned ring words, got float64")):
        clients["c00"].masked_input(deliveries["c00"], vector=np.zeros(5))
    with pytest.raises(dp.DPTypeError, match=re.escape("vec must have a float dtype, got int64")):
        dp.L2Clip(1.0).clip(np.array([1, 2]))


@pytest.mark.parametrize("dtype", ["complex128", "<U3", "object"])
def test_non_real_dtype_update_is_refused_naming_the_client(dtype):
    vec = np.array([1, 2]).astype(dtype)
    with pytest.raises(TypeError, match=rf"update of client 'a' .*dtype.*{re.escape(np.dtype(dtype).name)}"):
        PlaintextSum().aggregate({"a": vec}, round_index=1, rng=RNG)


def test_wrong_length_update_fails_a_round_naming_the_real_lengths(tmp_path):
    fed = _tampered_federation(lambda res: _replace(res, 1, update=res[1].update[:-1]), tmp_path)
    _fails_and_changes_nothing(fed, (ValueError, RoundFailedError), r"client 'client-1'.*length 6\b.*\b7\b")


@pytest.mark.filterwarnings("ignore::numpy.exceptions.ComplexWarning")
@pytest.mark.parametrize("make", [lambda u: u.astype(np.complex64), lambda u: list(u)], ids=["complex", "list"])
def test_update_of_the_wrong_type_fails_a_round_naming_the_client(make, tmp_path):
    fed = _tampered_federation(lambda res: _replace(res, 1, update=make(res[1].update)), tmp_path)
    _fails_and_changes_nothing(fed, (TypeError, RoundFailedError), r"client 'client-1'")


# ============================================================================= 3. unknown or duplicate client


def test_secagg_server_refuses_unknown_and_duplicate_senders():
    ids = ["c00", "c01", "c02"]
    server = SecAggServer(round_index=5, participants=ids, threshold=2, degree=2, length=3)
    clients = {c: SecAggClient(c, round_index=5) for c in ids}
    setups = server.setup_messages()
    ad = clients["c00"].advertise(setups["c00"])
    server.receive_advertisement(ad)
    with pytest.raises(ProtocolError, match=re.escape("second key advertisement from 'c00'")):
        server.receive_advertisement(ad)
    stranger = KeyAdvertisement(5, "intruder", bytes(32), bytes([1]) * 32, bytes(32), bytes(32)).to_bytes()
    with pytest.raises(ProtocolError, match=re.escape("key advertisement from 'intruder', not a participant")):
        server.receive_advertisement(stranger)


def test_he_server_refuses_duplicate_and_swapped_senders(ckks):
    holder, ctx, ct = ckks
    server = HEServer(holder.public_context())
    server.add("c1", ct)
    with pytest.raises(
        ProtocolError, match=re.escape("ciphertext of client 'c1': client 'c1' already contributed to this aggregate")
    ):
        server.add("c1", ct)
    with pytest.raises(ProtocolError, match=re.escape("ciphertext of client 'c2' names client 'c1' inside: swapped or replayed")):
        server.add("c2", ct)


def test_dropouts_naming_an_unknown_client_are_refused():
    with pytest.raises(ValueError, match=re.escape("dropouts names 'zz', which is not among the round's clients")):
        MaskedSum(value_bound=1.0, max_clients=4).aggregate(
            {c: np.zeros(2) for c in "abc"}, round_index=1, rng=RNG, dropouts={"zz": Stage.UNMASK}
        )


@pytest.mark.parametrize("masked", [False, True], ids=["plaintext", "masked"])
def test_result_from_an_unknown_client_fails_the_round(masked, tmp_path):
    kwargs = {"pipeline": _masked_pipeline()} if masked else {}
    fed = _tampered_federation(lambda res: _replace(res, 1, client_id="intruder"), tmp_path, **kwargs)
    _fails_and_changes_nothing(fed, FedcoreError, r"'intruder'.*(not a participant|not among)")


def test_two_results_from_one_client_fail_the_round(tmp_path):
    fed = _tampered_federation(lambda res: _replace(res, 1, client_id=res[0].client_id), tmp_path)
    _fails_and_changes_nothing(fed, FedcoreError, r"'client-0'.*(twice|duplicate|more than once)")


# ============================================================================= 4. message from an old round


def test_secagg_refuses_messages_of_another_round():
    old_server, old_clients, _, old_ads = _secagg_round(round_index=5)
    server = SecAggServer(round_index=6, participants=["c00", "c01", "c02"], threshold=2, degree=2, length=5)
    with pytest.raises(ProtocolError, match=re.escape("key advertisement for round 5; the server is in round 6")):
        server.receive_advertisement(old_ads["c00"])
    client = SecAggClient("c00", round_index=6)
    old_setup = SecAggServer(round_index=5, participants=["c00", "c01", "c02"], threshold=2, degree=2, length=5).setup_messages()
    with pytest.raises(ProtocolError, match=re.escape("client 'c00' is in round 6, setup is for round 5")):
        client.advertise(old_setup["c00"])


def test_he_ciphertext_of_an_earlier_round_is_refused(ckks):
    """CKKS rounds use fresh keys (``CKKSSum``), so a replayed ciphertext names a stale key set."""
    old_holder, _, old_ct = ckks
    holder = CKKSKeyHolder(value_bound=1.0, max_clients=4)
    server = HEServer(holder.public_context())
    pattern = (
        rf"ciphertext of client 'c1' was encrypted under key set '{old_holder.key_id}', this context holds key set "
        rf"'{holder.key_id}' \(a stale or foreign ciphertext\)"
    )
    with pytest.raises(ProtocolError, match=pattern):
        server.add("c1", old_ct)


# ============================================================================= 5. truncated or oversized bytes


def test_truncated_and_oversized_masked_messages_are_refused():
    ad = KeyAdvertisement(3, "c1", bytes(32), bytes(32), bytes(32), bytes(32)).to_bytes()
    with pytest.raises(ProtocolError, match=re.escape("message shorter than the 12-byte header")):
        decode_message(ad[:5])
    with pytest.raises(ProtocolError, match=re.escape("message truncated at byte 16 (field of 32 bytes)")):
        decode_message(ad[:20])
    with pytest.raises(ProtocolError, match=re.escape("1 trailing bytes after the message")):
        decode_message(ad + b"\x00")
    huge = bytearray(KeyList(3, "c1", (), ()).to_bytes())
    huge[-4:] = (2**32 - 1).to_bytes(4, "big")
    with pytest.raises(ProtocolError, match=re.escape("list of 4294967295 items cannot fit in the 0 bytes left")):
        decode_message(bytes(huge))


def test_masked_input_longer_than_the_round_is_refused():
    server, _, _, _ = _secagg_round(length=5)
    too_long = MaskedInput(5, "c00", 32, 6, bytes(24)).to_bytes()
    with pytest.raises(ProtocolError, match=re.escape("masked input of 'c00' has 6 x 32 bits, expected 5 x 32")):
        server.receive_masked_input(too_long)
    lying = bytearray(MaskedInput(5, "c00", 32, 5, bytes(20)).to_bytes())
    lying[18:26] = (10**12).to_bytes(8, "big")  # u64 length: after the 12-byte header, u16 + "c00" and the bits byte
    with pytest.raises(ProtocolError, match=re.escape("masked input claims 1000000000000 coordinates but holds 21 bytes")):
        server.receive_masked_input(bytes(lying))


def test_truncated_and_oversized_he_messages_are_refused(ckks):
    holder, _, ct = ckks
    server = HEServer(holder.public_context())
    with pytest.raises(
        ProtocolError, match=re.escape("ciphertext of client 'c1' is truncated: 10 bytes, a message has at least 46")
    ):
        server.add("c1", ct[:10])
    for edited in (ct[:-1], ct + b"\x00"):
        with pytest.raises(ProtocolError, match=re.escape("ciphertext of client 'c1' fails its SHA-256 check")):
            server.add("c1", edited)
    body = bytearray(ct[:-32])
    body[6:10] = struct.pack(">I", 70_000)
    with pytest.raises(
        ProtocolError, match=re.escape("ciphertext of client 'c1' declares a 70000-byte header that does not fit the message")
    ):
        server.add("c1", _reseal(bytes(body)))


def test_truncated_ledger_is_refused():
    ledger = dp.Ledger([dp.GaussianEvent(round_index=1, noise_multiplier=1.0, clip_bound=1.0, participants=3, survivors=3)])
    with pytest.raises(dp.DPValueError, match=re.escape("ledger text is not valid JSON")):
        dp.Ledger.from_json(ledger.to_json()[:-3])


@pytest.mark.parametrize(
    "edit",
    [lambda e: e.pop("clip_bound"), lambda e: e.update(mechanism=["gaussian"])],
    ids=["missing-field", "unhashable-mechanism"],
)
def test_damaged_ledger_record_is_refused(edit):
    ledger = dp.Ledger([dp.GaussianEvent(round_index=1, noise_multiplier=1.0, clip_bound=1.0, participants=3, survivors=3)])
    data = json.loads(ledger.to_json())
    edit(data["events"][0])
    with pytest.raises(dp.DPValueError, match=r"clip_bound|mechanism"):
        dp.Ledger.from_json(json.dumps(data))


@pytest.mark.parametrize("name", ["state.json", "global.npy"])
def test_truncated_checkpoint_file_is_refused_clearly(name, tmp_path):
    fed = Federation(task=ToyTask(), clients=toy_clients(3), strategy=FedAvg(), train=TRAIN, seed=1, reproducible=True, quiet=True,
                     evaluate_every=0, checkpoint_dir=tmp_path / "ckpt")  # fmt: skip
    fed.run(1)
    path = tmp_path / "ckpt" / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])
    with pytest.raises(ConfigError, match=re.escape(name)):
        load_checkpoint(tmp_path / "ckpt")


# ============================================================================= 6. wrong protocol version


def test_wrong_protocol_or_format_version_is_refused(ckks, tmp_path):
    ad = bytearray(KeyAdvertisement(3, "c1", bytes(32), bytes(32), bytes(32), bytes(32)).to_bytes())
    ad[2] = 1
    with pytest.raises(ProtocolError, match=re.escape("protocol version 1 is not supported (expected 2)")):
        decode_message(bytes(ad))
    holder, _, ct = ckks
    edited = bytearray(ct)
    edited[4] = 2
    with pytest.raises(
        ProtocolError, match=re.escape("ciphertext of client 'c1' has format version 2, this library reads version 1")
    ):
        HEServer(holder.public_context()).add("c1", bytes(edited))
    with pytest.raises(dp.DPValueError, match=re.escape("ledger schema must be 'privfl.dp.ledger/1', got 'privfl.dp.ledger/2'")):
        dp.Ledger.from_json(json.dumps({"schema": "privfl.dp.ledger/2", "events": []}))
    fed = Federation(task=ToyTask(), clients=toy_clients(3), strategy=FedAvg(), train=TRAIN, seed=1, reproducible=True, quiet=True,
                     evaluate_every=0, checkpoint_dir=tmp_path / "ckpt")  # fmt: skip
    fed.run(1)
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    state["format"] = "fedcore-checkpoint/3"
    (tmp_path / "ckpt" / "state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=re.escape("checkpoint format 'fedcore-checkpoint/3' is not 'fedcore-checkpoint/2'")):
        load_checkpoint(tmp_path / "ckpt")


# ============================================================================= 7. absurd number of examples


def test_absurd_example_count_is_capped_at_weight_one(tmp_path):
    """Example weights are min(n_k, max_examples) / max_examples: claiming 10^15 weighs like the largest client."""
    claimed = _federation(lambda res: _replace(res, 1, num_examples=10**15), tmp_path / "a")
    capped = _federation(lambda res: _replace(res, 1, num_examples=claimed.pipeline.max_examples), tmp_path / "b")
    claimed.run_round()
    capped.run_round()
    assert np.array_equal(claimed.global_vector, capped.global_vector)


@pytest.mark.parametrize("count", [-50, float("nan")], ids=["negative", "nan"])
@pytest.mark.parametrize("masked", [False, True], ids=["plaintext", "masked"])
def test_impossible_example_count_fails_the_round(count, masked, tmp_path):
    kwargs = {"pipeline": _masked_pipeline("examples")} if masked else {}
    fed = _tampered_federation(lambda res: _replace(res, 1, num_examples=count), tmp_path, **kwargs)
    _fails_and_changes_nothing(fed, FedcoreError, r"client 'client-1'.*num_examples")


# ============================================================================= 8. contexts or keys of the wrong kind


def test_he_parties_refuse_contexts_of_the_wrong_kind(ckks):
    holder, ctx, ct = ckks
    with pytest.raises(KeyMaterialError, match=re.escape(
        "server context holds a secret key (client context); the server accepts only the public context from "
        "key_holder.public_context()"
    )):  # fmt: skip
        HEServer(ctx)
    with pytest.raises(KeyMaterialError, match=re.escape("the server refuses a context that holds a secret key")):
        HEServer(holder)  # type: ignore[arg-type]
    with pytest.raises(KeyMaterialError, match=re.escape(
        "context of client 'c1': preset 'compact' encrypts with the secret key, which this context lacks"
    )):  # fmt: skip
        CKKSClient(holder.public_context(), client_id="c1")
    bfv = BFVKeyHolder(value_bound=1.0, max_clients=4)
    with pytest.raises(
        KeyMaterialError, match=re.escape("context of client 'c1': this is a bfv context, this client speaks ckks")
    ):
        CKKSClient(bfv.client_context(include_secret_key=True), client_id="c1")
    with pytest.raises(ProtocolError, match=re.escape("expected an aggregate ciphertext, got a client ciphertext")):
        holder.decrypt(ct)


def test_signed_round_refuses_missing_identity_keys():
    vectors = {c: np.zeros(2, dtype=np.uint32) for c in ("a", "b")}
    from secagg import _primitives as prim

    with pytest.raises(KeyMaterialError, match=re.escape("signed round needs an identity key for every client; missing ['b']")):
        secure_sum_integers(vectors, round_index=1, threshold=2, identity_keys={"a": prim.new_identity_key()})


def test_identity_key_of_the_wrong_type_is_refused():
    from cryptography.hazmat.primitives.asymmetric import x25519

    vectors = {c: np.zeros(2, dtype=np.uint32) for c in ("a", "b")}
    keys = {c: x25519.X25519PrivateKey.generate() for c in vectors}
    with pytest.raises(KeyMaterialError, match=r"Ed25519"):
        secure_sum_integers(vectors, round_index=1, threshold=2, identity_keys=keys)


def test_context_whose_blob_names_are_not_strings_is_refused(ckks):
    _, ctx, _ = ckks
    env = wire.unpack(ctx, what="context")
    header = dict(env.header)
    header["blobs"] = [header["blobs"][0], ["x"]]
    head = json.dumps(header).encode()
    parts = [struct.pack(">4sBBI", b"PFHE", 1, env.kind, len(head)), head, struct.pack(">I", len(env.blobs))]
    for blob in env.blobs:
        parts += [struct.pack(">Q", len(blob)), blob]
    with pytest.raises(ProtocolError, match="blob"):
        CKKSClient(_reseal(b"".join(parts)), client_id="c1")


# ============================================================================= 9. impossible configs


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: MaskedSum(value_bound=1.0, max_clients=2, threshold=5), ValueError, "threshold=5 exceeds max_clients=2"),
        (lambda: MaskedSum(value_bound=0.0, max_clients=2), ValueError, "value_bound must be a finite number > 0, got 0.0"),
        (lambda: MaskedSum(value_bound=1.0, max_clients=2, bits=16), ValueError, "bits must be one of (32, 64), got 16"),
        (
            lambda: MaskedSum(value_bound=1.0, max_clients=20, graph="star"),
            ValueError,
            "graph must be one of ('complete', 'secagg+'), got 'star'",
        ),
        (
            lambda: MaskedSum(value_bound=1.0, max_clients=20, graph="secagg+", degree=3),
            ValueError,
            "degree must be an even int >= 2, got 3",
        ),
        (
            lambda: MaskedSum(value_bound=1.0, max_clients=20, dropout_rate=1.5),
            ValueError,
            "dropout_rate must be in [0, 1), got 1.5",
        ),
        (lambda: CKKSKeyHolder(value_bound=1.0, max_clients=0), ValueError, "max_clients must be >= 1, got 0"),
        (
            lambda: CKKSKeyHolder("nope", value_bound=1.0, max_clients=4),
            ValueError,
            "preset must be one of ['compact', 'compact-pk', 'compat'], got 'nope'",
        ),
        (lambda: TrainConfig(lr=0.0), ConfigError, "lr must be a finite number > 0, got 0.0"),
        (lambda: TrainConfig(epochs=0), ConfigError, "epochs must be >= 1, got 0"),
        (lambda: DropoutSimulator(rate=1.0), ConfigError, "dropout rate must be in [0, 1), got 1.0"),
        (lambda: PoissonSampler(q=0.0), ConfigError, "q must be in (0, 1], got 0.0"),
        (lambda: FixedCountSampler(count=0), ConfigError, "count must be >= 1, got 0"),
        (lambda: UpdatePipeline(weighting="bogus"), ConfigError, "weighting must be one of ('examples', 'uniform'), got 'bogus'"),
        (lambda: FedAdam(beta1=1.0), ConfigError, "beta1 must be in [0, 1), got 1.0"),
        (lambda: Krum(num_byzantine=-1), ConfigError, "num_byzantine must be an int >= 0, got -1"),
        (
            lambda: dp.CentralGaussian(noise_multiplier=-1.0, clip_bound=1.0),
            dp.DPValueError,
            "noise_multiplier must be > 0, got -1.0",
        ),
        (lambda: dp.L2Clip(0.0), dp.DPValueError, "bound must be > 0, got 0.0"),
        (lambda: dp.PrivacyBudget(epsilon=1.0, delta=1.5), dp.DPValueError, "delta must be in (0, 1), got 1.5"),
    ],
    ids=lambda v: None,
)
def test_impossible_settings_are_refused_by_name_and_value(build, error, message):
    with pytest.raises(error, match=re.escape(message)):
        build()


def test_impossible_federations_are_refused_before_any_round():
    task = ToyTask()
    with pytest.raises(ConfigError, match=re.escape("clients must hold at least one client, got none")):
        Federation(task=task, clients={}, strategy=FedAvg(), train=TRAIN, quiet=True)
    with pytest.raises(ConfigError, match=re.escape("aggregation mode 'masked' needs a bound on every coordinate: set a clip")):
        Federation(task=task, clients=toy_clients(4), strategy=FedAvg(), train=TRAIN, quiet=True,
                   pipeline=UpdatePipeline(backend=MaskedSum(value_bound=1.0, max_clients=4), weighting="uniform"))  # fmt: skip
    noisy = UpdatePipeline(
        clip=dp.L2Clip(1.0), max_examples=10, central_noise=dp.CentralGaussian(noise_multiplier=1.0, clip_bound=1.0)
    )
    with pytest.raises(ConfigError, match=re.escape("client-level DP needs weighting='uniform'")):
        Federation(task=task, clients=toy_clients(4), strategy=FedAvg(), train=TRAIN, quiet=True, pipeline=noisy)
    fed = Federation(task=task, clients=toy_clients(4), strategy=FedAvg(), train=TRAIN, quiet=True)
    with pytest.raises(ConfigError, match=re.escape("on_budget must be 'stop' or 'raise', got 'maybe'")):
        fed.run(1, on_budget="maybe")
    with pytest.raises(OverflowRiskError, match=re.escape("a round of 3 clients exceeds max_clients=2")):
        MaskedSum(value_bound=1.0, max_clients=2).aggregate({c: np.zeros(2) for c in "abc"}, round_index=1, rng=RNG)
