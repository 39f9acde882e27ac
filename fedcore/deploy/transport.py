"""The gRPC transport between the server party and client processes, with mutual TLS on every call.

Who dials whom: every client process dials the server, so a client (a hospital, a shop) needs no
inbound port, as with Flower's SuperNodes and NVIDIA FLARE's clients. A client keeps one
server-streaming call ``Attend`` open; the server streams the messages addressed to that client down
it, and the client answers each message with one client-streaming call ``Reply``. The server knows a
client by its TLS certificate alone: :meth:`~fedcore.deploy.provision.ServerKit.admit` runs on every
call before anything of it is used, so an unknown, revoked or re-issued certificate is refused
before any message is sent to it or recorded from it (a certificate of another CA, or none, fails
the TLS handshake itself).

Service ``privfl.Federation`` (generic handlers, raw bytes, no protobuf code generation)::

    Attend(b"")              -> stream of frames   the messages for this client, in order
    Reply(stream of frames)  -> b""                the client's answer to one message

Frame (transport framing only; the message inside is exactly its documented format)::

    seq    8 bytes   unsigned big-endian sequence number of the message (its reply carries the same)
    last   1 byte    1 on the message's last chunk, else 0
    chunk            at most ``Limits.chunk_bytes`` bytes of the message

A message larger than ``chunk_bytes`` travels as several frames, so no gRPC message exceeds the
limit, and HTTP/2 flow control paces a large model (back-pressure: the server's stream yields the
next chunk only when the connection takes it). A reply also carries the metadata ``privfl-reply``:
``bytes`` (the frames hold the answer), ``none`` (the party had nothing to say) or ``error`` (the
party failed; ``privfl-error`` says why).

Faults: a client whose ``Attend`` call ends (its process died, its connection broke) has every
message it still owed answered with None at once, and later messages to it are None at once too,
until it attends again: the round counts it as a dropout. A client that stays connected but never
answers costs at most ``Limits.reply_deadline``. A late reply (after its deadline, or to a message
sent before a reconnect) is refused.
"""

from __future__ import annotations

import itertools
import logging
import struct
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from queue import Empty, Queue
from typing import Any, Callable, Iterable, Iterator, Mapping

import grpc

from secagg import KEY_HOLDER, ProtocolError

from ..errors import ConfigError, FedcoreError, RoundFailedError
from .provision import CertificateRefused, ClientKit, ServerKit

__all__ = ["Limits", "GrpcChannel", "ClientEndpoint", "Refused"]

log = logging.getLogger("fedcore.deploy")

SERVICE = "privfl.Federation"
_FRAME = struct.Struct(">QB")
_CLOSE = None  # the end of a client's Attend stream


class Refused(FedcoreError):
    """The server refused this client's certificate (the client should not retry)."""


@dataclass(frozen=True)
class Limits:
    """Sizes and deadlines of the transport; every wait is bounded by one of them.

    Args:
        chunk_bytes: the largest chunk of a message in one frame (one gRPC message).
        max_message_bytes: the largest whole message either side accepts.
        reply_deadline: seconds the server waits for a client's answer to one message.
        call_timeout: the deadline of each ``Reply`` call.
        attend_seconds: the deadline of an ``Attend`` call; the client then attends again.
        enrol_timeout: seconds the server waits, before its first message, for every client to attend.
        reconnect_seconds: how long a client keeps trying to reach a server that went away.
    """

    chunk_bytes: int = 1 << 20
    max_message_bytes: int = 1 << 30
    reply_deadline: float = 300.0
    call_timeout: float = 60.0
    attend_seconds: float = 3600.0
    enrol_timeout: float = 300.0
    reconnect_seconds: float = 120.0

    def __post_init__(self) -> None:
        for name in ("chunk_bytes", "max_message_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("reply_deadline", "call_timeout", "attend_seconds", "enrol_timeout", "reconnect_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name} must be a number of seconds > 0, got {value!r}")

    def grpc_options(self) -> list[tuple[str, Any]]:
        """Channel and server options: the per-message size limit and keepalive pings."""
        frame = self.chunk_bytes + _FRAME.size + 1024
        return [
            ("grpc.max_send_message_length", frame),
            ("grpc.max_receive_message_length", frame),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ]


def frames(seq: int, data: bytes, chunk_bytes: int) -> Iterator[bytes]:
    """The frames of one message (at least one, the last flagged)."""
    view = memoryview(data)
    count = max(1, -(-len(data) // chunk_bytes))
    for i in range(count):
        yield _FRAME.pack(seq, int(i == count - 1)) + bytes(view[i * chunk_bytes : (i + 1) * chunk_bytes])


def reassemble(stream: Iterable[bytes], max_bytes: int) -> tuple[int, bytes]:
    """One message from its frames: ``(seq, bytes)``.

    Raises:
        ProtocolError: a short frame, mixed sequence numbers, frames after the last, no last frame,
            or more than ``max_bytes`` bytes.
    """
    seq: int | None = None
    parts: list[bytes] = []
    size = 0
    done = False
    for frame in stream:
        if done:
            raise ProtocolError(f"a frame after the last frame of message {seq}")
        if len(frame) < _FRAME.size:
            raise ProtocolError(f"a frame of {len(frame)} bytes is shorter than its {_FRAME.size}-byte header")
        number, last = _FRAME.unpack_from(frame)
        if seq is not None and number != seq:
            raise ProtocolError(f"frame of message {number} inside message {seq}")
        seq = number
        size += len(frame) - _FRAME.size
        if size > max_bytes:
            raise ProtocolError(f"message {seq} exceeds the {max_bytes}-byte limit")
        parts.append(frame[_FRAME.size :])
        done = bool(last)
    if seq is None or not done:
        raise ProtocolError(f"message {seq} ended before its last frame")
    return seq, b"".join(parts)


class _Stream:
    """One open ``Attend`` call: the queue of messages still to stream to its client."""

    def __init__(self) -> None:
        self.queue: Queue[tuple[int, bytes] | None] = Queue()


class GrpcChannel:
    """The server party's :class:`~fedcore.rounds.parties.Channel` to client processes over gRPC + mutual TLS.

    ``exchange`` sends a batch to every recipient at once (each client's stream) and waits for
    the replies, each bounded by ``limits.reply_deadline``. Counts every byte of every frame it
    sends and receives, per client (:attr:`wire_sent`, :attr:`wire_received`), and the message
    bytes inside them (:attr:`bytes_sent`, :attr:`bytes_received`).

    Args:
        kit: the server's kit (its TLS key and certificate, the CA, the revocation list, the directory).
        address: ``host:port`` to listen on (port 0: a free port, see :attr:`port`).
        limits: sizes and deadlines.
    """

    def __init__(self, kit: ServerKit, *, address: str = "127.0.0.1:0", limits: Limits | None = None) -> None:
        self.kit = kit
        self.limits = limits or Limits()
        self.client_ids = sorted(kit.directory)
        self._lock = threading.Condition()
        self._streams: dict[str, _Stream] = {}
        self._pending: dict[int, tuple[str, Future[bytes | None]]] = {}
        self._seq = itertools.count(1)
        self._enrolled = False
        self.refusals: list[str] = []
        self.bytes_sent: Counter[str] = Counter()
        self.bytes_received: Counter[str] = Counter()
        self.wire_sent: Counter[str] = Counter()
        self.wire_received: Counter[str] = Counter()
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=2 * len(self.client_ids) + 8, thread_name_prefix="privfl-rpc"),
            options=self.limits.grpc_options(),
        )
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Attend": grpc.unary_stream_rpc_method_handler(self._attend),
                "Reply": grpc.stream_unary_rpc_method_handler(self._reply),
            },
        )
        self._server.add_generic_rpc_handlers((handler,))
        credentials = grpc.ssl_server_credentials(
            [(kit.tls_key, kit.certificate)], root_certificates=kit.ca, require_client_auth=True
        )
        try:
            self.port = self._server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on address {address!r}: {exc}") from exc
        self.address = f"{address.rpartition(':')[0]}:{self.port}"
        self._server.start()
        log.info("server listening on %s (mutual TLS; %d clients provisioned)", self.address, len(self.client_ids))

    # ------------------------------------------------------------------ the Channel protocol
    def exchange(self, batch: Mapping[str, bytes]) -> dict[str, bytes | None]:
        """Send every message of the batch at once; each reply or None (gone, failed, or late)."""
        posted = {str(r): self._post(str(r), bytes(m)) for r, m in batch.items()}
        deadline = time.monotonic() + self.limits.reply_deadline
        out: dict[str, bytes | None] = {}
        for cid, (seq, future) in posted.items():
            try:
                out[cid] = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                with self._lock:
                    self._pending.pop(seq, None)
                log.warning("%s missed the %.0f s reply deadline of message %d", cid, self.limits.reply_deadline, seq)
                out[cid] = None
        return out

    def send(self, recipient: str, message: bytes) -> bytes | None:
        """One message, one reply."""
        return self.exchange({recipient: message})[recipient]

    def wait_for_clients(self, timeout: float, *, ids: Iterable[str] | None = None) -> list[str]:
        """Wait until every provisioned client (or each of ``ids``) attends or ``timeout`` passes; the clients attending."""
        wanted = set(self.client_ids if ids is None else ids)
        end = time.monotonic() + timeout
        with self._lock:
            while not wanted <= set(self._streams) and time.monotonic() < end:
                self._lock.wait(timeout=max(0.0, min(1.0, end - time.monotonic())))
            return sorted(self._streams)

    def close(self) -> None:
        """End every client's stream (the run is over: clients exit) and stop listening."""
        with self._lock:
            for stream in self._streams.values():
                stream.queue.put(_CLOSE)
        self._server.stop(grace=5.0).wait(timeout=10.0)

    # ------------------------------------------------------------------ internals
    def _post(self, cid: str, message: bytes) -> tuple[int, Future[bytes | None]]:
        if cid == KEY_HOLDER:
            raise ProtocolError("the HE key holder has no process in a deployment: use aggregation.mode 'masked' or 'plaintext'")
        if cid not in self.kit.directory:
            raise ProtocolError(f"a message for {cid!r}, which is no provisioned client of this federation")
        if len(message) > self.limits.max_message_bytes:
            raise ProtocolError(f"a message of {len(message)} bytes exceeds max_message_bytes={self.limits.max_message_bytes}")
        if not self._enrolled:
            attending = self.wait_for_clients(self.limits.enrol_timeout)
            missing = sorted(set(self.client_ids) - set(attending))
            log.info(
                "%d of %d clients attending%s", len(attending), len(self.client_ids), f"; missing {missing}" if missing else ""
            )
            self._enrolled = True
        future: Future[bytes | None] = Future()
        with self._lock:
            stream = self._streams.get(cid)
            if stream is None:
                future.set_result(None)  # not attending: a dropout at once
                return 0, future
            seq = next(self._seq)
            self._pending[seq] = (cid, future)
            stream.queue.put((seq, message))
        self.bytes_sent[cid] += len(message)
        return seq, future

    def _admit(self, context: grpc.ServicerContext) -> str:
        pem = context.auth_context().get("x509_pem_cert")
        try:
            if not pem:
                raise CertificateRefused("no client certificate")
            return self.kit.admit(pem[0])
        except CertificateRefused as exc:
            with self._lock:
                self.refusals.append(str(exc))
            log.warning("refused a peer: %s", exc)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            raise  # not reached: abort raises

    def _fail_pending(self, cid: str) -> None:
        """Caller holds the lock: every message ``cid`` still owes is answered None."""
        for seq in [s for s, (owner, _) in self._pending.items() if owner == cid]:
            self._pending.pop(seq)[1].set_result(None)

    def _attend(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        cid = self._admit(context)
        stream = _Stream()
        with self._lock:
            previous = self._streams.get(cid)
            if previous is not None:  # a reconnect: what the old call owed is lost
                previous.queue.put(_CLOSE)
                self._fail_pending(cid)
            self._streams[cid] = stream
            self._lock.notify_all()
        context.add_callback(lambda: self._gone(cid, stream))
        log.info("%s attended", cid)
        while context.is_active():
            try:
                item = stream.queue.get(timeout=0.5)
            except Empty:
                continue
            if item is _CLOSE:
                return
            seq, message = item
            with self._lock:
                if seq not in self._pending:  # timed out before it left
                    continue
            for frame in frames(seq, message, self.limits.chunk_bytes):
                self.wire_sent[cid] += len(frame)
                yield frame

    def _gone(self, cid: str, stream: _Stream) -> None:
        with self._lock:
            if self._streams.get(cid) is stream:
                del self._streams[cid]
                self._fail_pending(cid)
                log.info("%s left", cid)

    def _reply(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        cid = self._admit(context)
        metadata = dict(context.invocation_metadata())
        received = 0

        def counted() -> Iterator[bytes]:
            nonlocal received
            for frame in request_iterator:
                received += len(frame)
                yield frame

        try:
            seq, data = reassemble(counted(), self.limits.max_message_bytes)
        except ProtocolError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.wire_received[cid] += received
        with self._lock:
            entry = self._pending.get(seq)
            if entry is None or entry[0] != cid:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, f"no message {seq} to {cid!r} awaits a reply (late, or never sent)"
                )
                raise ProtocolError(f"no message {seq} awaits a reply")  # not reached: abort raises
            del self._pending[seq]
        kind = metadata.get("privfl-reply", "bytes")
        if kind == "error":
            log.warning("%s failed on message %d: %s", cid, seq, metadata.get("privfl-error", "no reason given"))
        if kind == "bytes":
            self.bytes_received[cid] += len(data)
        entry[1].set_result(data if kind == "bytes" else None)
        return b""


class ClientEndpoint:
    """A client process's side of the transport: attend the server, answer each message it streams.

    Args:
        kit: this client's kit (TLS key and certificate, CA).
        server: the server's ``host:port``.
        answer: the client party's answer to one message (None: nothing to say); an exception is
            reported to the server as this client's failure on that message.
        limits: sizes and deadlines.
        server_name: the name the server's certificate must carry, when ``server`` is an address
            it was not issued for.
    """

    def __init__(
        self,
        kit: ClientKit,
        server: str,
        *,
        answer: Callable[[bytes], bytes | None],
        limits: Limits | None = None,
        server_name: str | None = None,
    ) -> None:
        self.kit = kit
        self.server = server
        self.answer = answer
        self.limits = limits or Limits()
        self._credentials = grpc.ssl_channel_credentials(
            root_certificates=kit.ca, private_key=kit.tls_key, certificate_chain=kit.certificate
        )
        self._options = self.limits.grpc_options()
        if server_name is not None:
            self._options.append(("grpc.ssl_target_name_override", server_name))

    def serve(self) -> None:
        """Answer the server until it ends the run; when it goes away, keep trying for ``reconnect_seconds``.

        Raises:
            Refused: the server refused this client's certificate.
            RoundFailedError: the server stayed unreachable for ``reconnect_seconds``.
        """
        last_contact = time.monotonic()
        backoff = 0.2
        while True:
            with grpc.secure_channel(self.server, self._credentials, options=self._options) as channel:
                attend = channel.unary_stream(f"/{SERVICE}/Attend")
                reply = channel.stream_unary(f"/{SERVICE}/Reply")
                try:
                    stream = attend(b"", timeout=self.limits.attend_seconds)
                    buffer: list[bytes] = []
                    for frame in stream:
                        last_contact, backoff = time.monotonic(), 0.2
                        buffer.append(frame)
                        if frame[_FRAME.size - 1]:
                            seq, message = reassemble(buffer, self.limits.max_message_bytes)
                            buffer = []
                            self._answer(reply, seq, message)
                    log.info("%s: the server ended the run", self.kit.client_id)
                    return
                except grpc.RpcError as exc:
                    code = exc.code() if isinstance(exc, grpc.Call) else None
                    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                        raise Refused(f"the server refused {self.kit.client_id!r}: {exc.details()}") from exc
                    if code != grpc.StatusCode.DEADLINE_EXCEEDED:
                        waited = time.monotonic() - last_contact
                        if waited > self.limits.reconnect_seconds:
                            raise RoundFailedError(
                                f"the server at {self.server} stayed unreachable for {waited:.0f} s: {code}"
                            ) from exc
                        time.sleep(backoff)
                        backoff = min(2.0, backoff * 2)

    def _answer(self, reply: Any, seq: int, message: bytes) -> None:
        metadata: list[tuple[str, str]]
        try:
            response = self.answer(message)
            metadata = [("privfl-reply", "bytes" if response is not None else "none")]
        except Exception as exc:  # reported to the server as this client's failure, then the client goes on
            log.warning("%s failed on message %d: %s: %s", self.kit.client_id, seq, type(exc).__name__, exc)
            response = None
            reason = "".join(c if " " <= c <= "~" else "?" for c in f"{type(exc).__name__}: {exc}")[:2000]
            metadata = [("privfl-reply", "error"), ("privfl-error", reason)]  # metadata values are printable ASCII
        try:
            reply(frames(seq, response or b"", self.limits.chunk_bytes), timeout=self.limits.call_timeout, metadata=metadata)
        except grpc.RpcError as exc:
            log.warning("%s: the reply to message %d was not taken: %s", self.kit.client_id, seq, exc)
