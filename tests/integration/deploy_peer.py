"""A client process with an injected fault, for ``test_deploy.py`` (test code, not part of the library).

``python -m tests.integration.deploy_peer FAULT ROUND CONFIG --kit DIR --server ADDR``, where FAULT is

* ``die-masked-input``: kill -9 itself on receiving the server's share delivery of round ROUND
  (the masked-input stage: its masked input is never sent);
* ``die-unmask``: kill -9 itself on receiving the unmask request of round ROUND (its masked input
  was sent, its shares for the unmasking are not);
* ``replay``: in round ROUND and every later one, answer the share delivery with its masked input
  captured in round ROUND - 1 (a replay by a client holding a valid certificate), once the file
  ``replay-gate`` exists beside the config (the test makes it after restarting the server).

Otherwise it is ``fedcore client``: the same kit, party and transport.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from fedcore.deploy.processes import PartyAnswer, client_party
from fedcore.deploy.provision import ClientKit
from fedcore.deploy.transport import ClientEndpoint, Limits
from fedcore.experiments.config import load_config
from secagg.messages import MessageKind

_TRIGGER = {
    "die-masked-input": MessageKind.SHARE_DELIVERY,
    "die-unmask": MessageKind.UNMASK_REQUEST,
    "replay": MessageKind.SHARE_DELIVERY,
}


def _secagg(message: bytes) -> tuple[MessageKind, int] | None:
    """The kind and round of a masked-aggregation message (its 12-byte header), else None."""
    if message[:2] != b"SA" or len(message) < 12:
        return None
    return MessageKind(message[3]), int.from_bytes(message[4:12], "big")


class FaultyAnswer:
    def __init__(self, inner: PartyAnswer, fault: str, round_index: int, gate: Path | None = None) -> None:
        self.inner, self.fault, self.round_index, self.gate = inner, fault, round_index, gate
        self.captured: dict[int, bytes] = {}

    def __call__(self, message: bytes) -> bytes | None:
        head = _secagg(message)
        replay = self.fault == "replay"
        hit = (
            head is not None
            and head[0] == _TRIGGER[self.fault]
            and (head[1] >= self.round_index if replay else head[1] == self.round_index)
        )
        if hit and replay and self.gate is not None:
            while not self.gate.exists():  # hold the round until the test has restarted the server
                time.sleep(0.1)
        if hit and self.fault.startswith("die"):
            print(f"{self.inner.client_id}: kill -9 at {head[0].name} of round {head[1]}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        reply = self.inner(message)
        if head is not None and head[0] == MessageKind.SHARE_DELIVERY:
            self.captured[head[1]] = reply
            before = self.round_index - 1
            if hit and before in self.captured:
                print(f"{self.inner.client_id}: replaying its masked input of round {before}", flush=True)
                return self.captured[before]
        return reply


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("fault", choices=sorted(_TRIGGER))
    parser.add_argument("round", type=int)
    parser.add_argument("config")
    parser.add_argument("--kit", required=True)
    parser.add_argument("--server", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    kit = ClientKit.load(args.kit)
    gate = Path(args.config).parent / "replay-gate"  # the replay waits for this file (the test's restarted server)
    answer = FaultyAnswer(PartyAnswer(client_party(load_config(args.config), kit), kit.client_id), args.fault, args.round, gate)
    ClientEndpoint(kit, args.server, answer=answer, limits=Limits(reconnect_seconds=120.0)).serve()


if __name__ == "__main__":
    main()
