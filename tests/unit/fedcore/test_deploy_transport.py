"""Provisioning, mutual TLS admission and the gRPC transport, over real sockets on 127.0.0.1.

Client endpoints run in threads here (the transport is the same in a process); the processes
themselves, kills and restarts are in ``tests/integration/test_deploy.py``.
"""

from __future__ import annotations

import stat
import threading
import time

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.deploy import ClientEndpoint, ClientKit, GrpcChannel, Limits, Refused, ServerKit, provision, revoke
from fedcore.deploy.provision import IDENTITY_URN
from fedcore.deploy.transport import SERVICE, frames, reassemble
from fedcore.errors import ConfigError
from secagg import ProtocolError

IDS = ["alpha", "zip-0+1"]
FAST = Limits(reply_deadline=5.0, enrol_timeout=5.0, call_timeout=5.0, reconnect_seconds=2.0, chunk_bytes=1000)
ALONE = Limits(reply_deadline=5.0, enrol_timeout=0.2, call_timeout=5.0, reconnect_seconds=2.0, chunk_bytes=1000)  # not all attend


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    return provision(tmp_path_factory.mktemp("prov") / "kits", client_ids=IDS)


@pytest.fixture
def channel(kits):
    ch = GrpcChannel(ServerKit(kits / "server"), limits=FAST)
    yield ch
    ch.close()


def _serve(kits, cid, address, answer, limits=FAST):
    endpoint = ClientEndpoint(ClientKit.load(kits / "clients" / cid), address, answer=answer, limits=limits)
    errors: list[BaseException] = []

    def run():
        try:
            endpoint.serve()
        except BaseException as exc:  # the test reads it
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def _raw_attend(address, credentials):
    """One Attend call with the given credentials: the first frame or the RPC error."""
    with grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        return next(iter(ch.unary_stream(f"/{SERVICE}/Attend")(b"", timeout=3.0)))


# ---------------------------------------------------------------- provisioning


def test_each_kit_holds_only_its_own_party_and_the_certificate_binds_the_identity_key(kits):
    assert sorted(p.name for p in (kits / "server").iterdir()) == [
        "ca.pem",
        "crl.pem",
        "directory.json",
        "server.key",
        "server.pem",
    ]
    for cid in IDS:
        folder = kits / "clients" / cid
        assert sorted(p.name for p in folder.iterdir()) == [
            "ca.pem",
            "client.key",
            "client.pem",
            "directory.json",
            "identity.key",
        ]
        for secret in ("client.key", "identity.key"):
            assert stat.S_IMODE((folder / secret).stat().st_mode) == 0o600
        kit = ClientKit.load(folder)
        cert = x509.load_pem_x509_certificate(kit.certificate)
        public = kit.identity_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
        assert kit.client_id == cid and uris == [IDENTITY_URN + public.hex()]
        assert ServerKit(kits / "server").identity_keys[cid] == public == kit.directory[cid]
    other = (kits / "clients" / IDS[0] / "identity.key").read_bytes()
    assert all(other not in p.read_bytes() for p in (kits / "clients" / IDS[1]).iterdir())
    assert b"PRIVATE" not in (kits / "server" / "directory.json").read_bytes()


def test_provisioning_refuses_bad_ids_and_a_used_folder(kits, tmp_path):
    with pytest.raises(ConfigError, match=r"client ids must match .* \(they name folders\), got \['../x'\]"):
        provision(tmp_path / "a", client_ids=["../x"])
    with pytest.raises(ConfigError, match=r"client_ids must be distinct and at least one, got \['a', 'a'\]"):
        provision(tmp_path / "b", client_ids=["a", "a"])
    with pytest.raises(ConfigError, match="already holds a provisioning"):
        provision(kits, client_ids=["a"])
    with pytest.raises(ConfigError, match=r"client 'nobody' is not in the federation's directory"):
        revoke(kits, "nobody")


def test_a_kit_whose_certificate_binds_another_identity_key_is_refused(kits, tmp_path):
    folder = tmp_path / "swapped"
    folder.mkdir()
    for p in (kits / "clients" / IDS[0]).iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "identity.key").write_bytes((kits / "clients" / IDS[1] / "identity.key").read_bytes())
    with pytest.raises(ConfigError, match="client.pem does not bind the identity key"):
        ClientKit.load(folder)


def test_limits_name_the_bad_value():
    with pytest.raises(ConfigError, match="chunk_bytes must be an int >= 1, got 0"):
        Limits(chunk_bytes=0)
    with pytest.raises(ConfigError, match="reply_deadline must be a number of seconds > 0, got -1"):
        Limits(reply_deadline=-1)


# ---------------------------------------------------------------- frames


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=5000), chunk=st.integers(1, 700), seq=st.integers(0, 2**64 - 1))
def test_frames_reassemble_to_the_message(data, chunk, seq):
    parts = list(frames(seq, data, chunk))
    assert len(parts) == max(1, -(-len(data) // chunk)) and all(len(p) <= chunk + 9 for p in parts)
    assert reassemble(parts, max_bytes=len(data)) == (seq, data)


def test_broken_frame_streams_are_refused():
    parts = list(frames(7, b"x" * 30, 10))
    with pytest.raises(ProtocolError, match="ended before its last frame"):
        reassemble(parts[:-1], max_bytes=100)
    with pytest.raises(ProtocolError, match="frame of message 8 inside message 7"):
        reassemble(parts[:1] + list(frames(8, b"y", 10)), max_bytes=100)
    with pytest.raises(ProtocolError, match="exceeds the 20-byte limit"):
        reassemble(parts, max_bytes=20)
    with pytest.raises(ProtocolError, match="a frame after the last frame"):
        reassemble(parts + parts[-1:], max_bytes=100)


# ---------------------------------------------------------------- the channel


def test_messages_larger_than_a_chunk_cross_both_ways_and_every_frame_byte_is_counted(kits, channel):
    threads = [_serve(kits, cid, channel.address, lambda m, cid=cid: cid.encode() + m[::-1])[0] for cid in IDS]
    big = bytes(range(256)) * 40  # 10,240 bytes: 11 chunks of 1,000
    replies = channel.exchange({"alpha": big, "zip-0+1": b"abc"})
    assert replies == {"alpha": b"alpha" + big[::-1], "zip-0+1": b"zip-0+1cba"}
    assert channel.bytes_sent == {"alpha": len(big), "zip-0+1": 3}
    assert channel.wire_sent == {"alpha": len(big) + 11 * 9, "zip-0+1": 3 + 9}
    assert channel.bytes_received["alpha"] == len(big) + 5 and channel.wire_received["alpha"] == len(big) + 5 + 11 * 9
    channel.close()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive()  # the end of the run ends each client's serve()


def test_a_client_that_never_answers_costs_its_deadline_and_its_late_reply_is_refused(kits):
    limits = Limits(reply_deadline=0.5, enrol_timeout=5.0, call_timeout=5.0, reconnect_seconds=2.0)
    ch = GrpcChannel(ServerKit(kits / "server"), limits=limits)
    release = threading.Event()

    def slow(message):
        release.wait(timeout=10)
        return b"late"

    try:
        _serve(kits, "alpha", ch.address, slow, limits)
        _serve(kits, "zip-0+1", ch.address, lambda m: b"ok", limits)
        assert ch.exchange({"alpha": b"?", "zip-0+1": b"?"}) == {"alpha": None, "zip-0+1": b"ok"}
        release.set()
        # the client answers in order: its answer to the second message comes after its late first one
        assert ch.exchange({"alpha": b"?"}) == {"alpha": b"late"}
        assert ch.bytes_received["alpha"] == len(b"late")  # the late reply was refused, not counted
    finally:
        ch.close()


def test_a_client_that_fails_answers_none_at_once(kits, channel):
    def broken(message):
        raise ValueError("no data")

    _serve(kits, "alpha", channel.address, broken)
    _serve(kits, "zip-0+1", channel.address, lambda m: b"ok")
    assert channel.exchange({"alpha": b"?", "zip-0+1": b"?"}) == {"alpha": None, "zip-0+1": b"ok"}


def test_a_message_for_no_provisioned_client_is_a_protocol_error(channel):
    with pytest.raises(ProtocolError, match="a message for 'mallory', which is no provisioned client"):
        channel.exchange({"mallory": b"x"})


# ---------------------------------------------------------------- refusals at the handshake


def test_no_certificate_or_another_cas_certificate_fails_the_handshake_and_nothing_is_recorded(kits, tmp_path):
    channel = GrpcChannel(ServerKit(kits / "server"), limits=ALONE)
    ca = (kits / "server" / "ca.pem").read_bytes()
    other = provision(tmp_path / "other", client_ids=["alpha"])  # same client id, another CA
    foreign = ClientKit.load(other / "clients" / "alpha")
    for credentials in (
        grpc.ssl_channel_credentials(root_certificates=ca),
        grpc.ssl_channel_credentials(root_certificates=ca, private_key=foreign.tls_key, certificate_chain=foreign.certificate),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            _raw_attend(channel.address, credentials)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake failed
    assert channel.refusals == [] and channel.wait_for_clients(0.1) == []
    assert channel.exchange({"alpha": b"x"}) == {"alpha": None} and channel.bytes_sent["alpha"] == 0
    channel.close()


def test_a_revoked_certificate_is_refused_before_anything_is_recorded(kits, tmp_path):
    fresh = provision(tmp_path / "kits", client_ids=IDS)
    ch = GrpcChannel(ServerKit(fresh / "server"), limits=ALONE)
    try:
        revoke(fresh, "alpha")  # after the server started: it reads the new list on the next call
        thread, errors = _serve(fresh, "alpha", ch.address, lambda m: b"never")
        thread.join(timeout=10)
        assert len(errors) == 1 and isinstance(errors[0], Refused)
        assert "revoked" in str(errors[0]) and "alpha" in str(errors[0])
        assert len(ch.refusals) == 1 and "revoked" in ch.refusals[0]
        _serve(fresh, "zip-0+1", ch.address, lambda m: b"ok")
        assert ch.wait_for_clients(5.0, ids=["zip-0+1"]) == ["zip-0+1"]
        assert ch.exchange({"alpha": b"x", "zip-0+1": b"x"}) == {"alpha": None, "zip-0+1": b"ok"}
        assert ch.bytes_sent["alpha"] == 0 and ch.bytes_received["alpha"] == 0
    finally:
        ch.close()


def test_a_certificate_of_the_ca_that_is_not_the_provisioned_one_is_refused(kits, tmp_path):
    fresh = provision(tmp_path / "kits", client_ids=IDS)
    # the server's directory lists another certificate for 'alpha' (as after a re-issue): the
    # kit's certificate, though issued by the server's CA, is not the listed one
    (fresh / "server" / "directory.json").write_bytes((kits / "server" / "directory.json").read_bytes())
    ch = GrpcChannel(ServerKit(fresh / "server"), limits=FAST)
    try:
        thread, errors = _serve(fresh, "alpha", ch.address, lambda m: b"never")
        thread.join(timeout=10)
        assert len(errors) == 1 and isinstance(errors[0], Refused) and "is not the one provisioned for it" in str(errors[0])
    finally:
        ch.close()


def test_clients_reconnect_to_a_restarted_server(kits):
    ch = GrpcChannel(ServerKit(kits / "server"), limits=FAST)
    port = ch.port
    thread, errors = _serve(kits, "alpha", ch.address, lambda m: b"ok", Limits(reconnect_seconds=20.0, chunk_bytes=1000))
    assert ch.wait_for_clients(5.0, ids=["alpha"]) == ["alpha"]
    ch._server.stop(grace=None).wait(timeout=5)  # the server goes away without ending the run
    time.sleep(0.5)
    again = GrpcChannel(ServerKit(kits / "server"), address=f"127.0.0.1:{port}", limits=ALONE)
    try:
        assert again.wait_for_clients(10.0, ids=["alpha"]) == ["alpha"]
        assert again.exchange({"alpha": b"x"}) == {"alpha": b"ok"}
    finally:
        again.close()
    thread.join(timeout=10)
    assert not thread.is_alive() and errors == []


# ---------------------------------------------------------------- the client process's party


class _Side:
    """A stand-in client side: each TRAIN moves the local state on by one."""

    def __init__(self):
        from types import SimpleNamespace

        self.clients = {"alpha": SimpleNamespace(local_state={"v": 0})}
        self.started_from: list[int] = []

    def handle_batch(self, batch):
        client = self.clients["alpha"]
        self.started_from.append(client.local_state["v"])
        client.local_state = {"v": client.local_state["v"] + 1}
        return {"alpha": b"report"}


def test_a_train_sent_again_for_the_same_round_starts_from_the_state_before_that_round():
    from fedcore.deploy.processes import PartyAnswer
    from fedcore.rounds import messages as msg

    side = _Side()
    answer = PartyAnswer(side, "alpha")
    train = {t: msg.encode(msg.Kind.TRAIN, {"round": t, "version": t - 1}, np.zeros(3, np.float32)) for t in (1, 2)}
    for t in (1, 2, 2, 2):  # round 2 sent again twice (a server restarted mid-round, twice)
        assert answer(train[t]) == b"report"
    assert side.started_from == [0, 1, 1, 1]


def test_modes_a_deployment_cannot_run_are_refused_before_any_process_works():
    from fedcore.deploy.processes import check_deployable
    from fedcore.experiments.config import parse_config

    with pytest.raises(ConfigError, match="aggregation.mode 'ckks' needs an HE key holder party"):
        check_deployable(parse_config({"aggregation": {"mode": "ckks"}}))
    with pytest.raises(ConfigError, match="executor 'ray': in a deployment each client process trains itself"):
        check_deployable(parse_config({"executor": "ray"}))


def test_a_client_whose_connection_drops_mid_message_is_a_dropout_without_waiting_for_its_deadline(kits):
    ch = GrpcChannel(ServerKit(kits / "server"), limits=Limits(reply_deadline=600.0, enrol_timeout=0.2))
    kit = ClientKit.load(kits / "clients" / "alpha")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=kit.ca, private_key=kit.tls_key, certificate_chain=kit.certificate
    )
    raw = grpc.secure_channel(ch.address, credentials)
    stream = raw.unary_stream(f"/{SERVICE}/Attend")(b"", timeout=60.0)
    result: dict = {}
    try:
        assert ch.wait_for_clients(10.0, ids=["alpha"]) == ["alpha"]
        exchange = threading.Thread(target=lambda: result.update(ch.exchange({"alpha": b"train"})), daemon=True)
        exchange.start()
        assert reassemble([next(iter(stream))], max_bytes=100)[1] == b"train"  # the message arrived...
        raw.close()  # ...and the client is gone before it answers, as when its process is killed
        exchange.join(timeout=30.0)  # far below the 600 s deadline
        assert not exchange.is_alive() and result == {"alpha": None}
        assert ch.exchange({"alpha": b"again"}) == {"alpha": None} and ch.bytes_sent["alpha"] == len(b"train")
    finally:
        ch.close()


def test_a_client_that_reconnects_mid_message_loses_it_and_its_answer_to_it_is_refused(kits):
    ch = GrpcChannel(ServerKit(kits / "server"), limits=Limits(reply_deadline=600.0, enrol_timeout=0.2))
    kit = ClientKit.load(kits / "clients" / "alpha")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=kit.ca, private_key=kit.tls_key, certificate_chain=kit.certificate
    )
    raw = grpc.secure_channel(ch.address, credentials)
    attend = raw.unary_stream(f"/{SERVICE}/Attend")
    result: dict = {}
    try:
        first = attend(b"", timeout=60.0)
        assert ch.wait_for_clients(10.0, ids=["alpha"]) == ["alpha"]
        exchange = threading.Thread(target=lambda: result.update(ch.exchange({"alpha": b"train"})), daemon=True)
        exchange.start()
        seq, message = reassemble([next(iter(first))], max_bytes=100)
        second = attend(b"", timeout=60.0)  # the client attends again before answering
        exchange.join(timeout=30.0)
        assert not exchange.is_alive() and result == {"alpha": None}  # the round counts it as dropped
        with pytest.raises(grpc.RpcError) as refused:
            raw.stream_unary(f"/{SERVICE}/Reply")(iter(frames(seq, b"report", 1000)), timeout=10.0)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and ch.bytes_received["alpha"] == 0
        later = threading.Thread(target=lambda: result.update(ch.exchange({"alpha": b"next"})), daemon=True)
        later.start()  # the next message reaches it on its new stream
        seq, message = reassemble([next(iter(second))], max_bytes=100)
        raw.stream_unary(f"/{SERVICE}/Reply")(iter(frames(seq, b"ok", 1000)), timeout=10.0, metadata=[("privfl-reply", "bytes")])
        later.join(timeout=30.0)
        assert message == b"next" and result == {"alpha": b"ok"}
    finally:
        raw.close()
        ch.close()
