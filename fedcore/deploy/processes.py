"""``fedcore server`` and ``fedcore client``: the server party and one client party, each in its own process.

The server process holds the server party (:class:`~fedcore.rounds.server.Federation` with a
:class:`~fedcore.deploy.transport.GrpcChannel`): global model, strategy, ledger, budget,
checkpoints, the clients' identity public keys. It builds the workload from the config for the
model, the clients' declared training-set sizes and the DP-SGD settings check, and hands no client
data to any party: no client party runs in it.

A client process holds one client party (:class:`~fedcore.rounds.parties.ClientSide` with that client
alone): it partitions the workload from the config exactly as the server does, keeps only its own
silo (the others are dropped once partitioned), trains, and protects its update with its identity
key from its kit and its own randomness (OS CSPRNG, or derived from the simulation seed when
``reproducible = true``). Both sides build the same public description of the federation (pipeline,
protection plan, DP settings) from the same config, so a deployment's messages are the simulation's
messages and, in simulation mode, its model is the simulation's bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError
from ..experiments.config import ExperimentConfig
from ..rounds import messages as msg
from .provision import ClientKit, ServerKit
from .transport import ClientEndpoint, GrpcChannel, Limits

__all__ = ["check_deployable", "serve", "client_party", "PartyAnswer", "run_client"]

log = logging.getLogger("fedcore.deploy")


def check_deployable(config: ExperimentConfig) -> None:
    """Refuse what a deployment cannot run yet, before any process starts work.

    Raises:
        ConfigError: an HE mode (its key holder has no process of its own) or the Ray executor.
    """
    if config.aggregation.mode in ("ckks", "bfv"):
        raise ConfigError(
            f"aggregation.mode {config.aggregation.mode!r} needs an HE key holder party, which has no process of its "
            "own in a deployment yet; use 'masked' or 'plaintext'"
        )
    if config.executor != "in-process":
        raise ConfigError(f"executor {config.executor!r}: in a deployment each client process trains itself; use 'in-process'")


def serve(
    config: ExperimentConfig,
    *,
    kit: str | Path,
    address: str = "127.0.0.1:0",
    resume: bool = False,
    limits: Limits | None = None,
    port_file: str | Path | None = None,
) -> Any:
    """Run the server party: listen, wait for the clients, run every round, write the outputs.

    Returns the :class:`~fedcore.experiments.experiment.ExperimentOutcome` (the same outputs as ``fedcore run``,
    and ``deployment.json``: the bytes sent to and received from each client, message bytes and
    frame bytes, and every refused certificate). The clients' streams are closed at the end, so
    client processes exit.
    """
    check_deployable(config)
    server_kit = ServerKit(kit)
    channel = GrpcChannel(server_kit, address=address, limits=limits)
    if port_file is not None:
        partial = Path(str(port_file) + ".part")
        partial.write_text(str(channel.port), encoding="utf-8")
        os.replace(partial, port_file)  # whoever waits for the file reads a whole port number
    try:
        from ..experiments.experiment import run_experiment
        from ..rounds.checkpoint import load_checkpoint

        checkpoint = Path(config.output_dir) / "checkpoint"
        if resume and checkpoint.exists():
            log.info("resuming after round %d from %s", load_checkpoint(checkpoint).round_index, checkpoint)
        outcome = run_experiment(config, resume=resume, channel=channel, directory=server_kit.identity_keys)
    finally:
        channel.close()
        _write_transport(Path(config.output_dir) / "deployment.json", channel)
    outcome.paths["deployment"] = Path(config.output_dir) / "deployment.json"
    return outcome


def _write_transport(path: Path, channel: GrpcChannel) -> None:
    """What crossed the wire in this server process's life, per client, and the certificates it refused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = {
        name: dict(sorted(getattr(channel, name).items()))
        for name in ("bytes_sent", "bytes_received", "wire_sent", "wire_received")
    }
    path.write_text(json.dumps({"address": channel.address, **counts, "refusals": channel.refusals}, indent=1), encoding="utf-8")


class _Unreachable:
    """The channel of a federation built only as a public description (in a client process): never used."""

    def exchange(self, batch: Mapping[str, bytes]) -> dict[str, bytes | None]:
        raise ConfigError("a client process builds the federation's description only; it sends nothing to anyone")

    def send(self, recipient: str, message: bytes) -> bytes | None:
        raise ConfigError("a client process builds the federation's description only; it sends nothing to anyone")


def client_party(config: ExperimentConfig, kit: ClientKit) -> Any:
    """The :class:`~fedcore.rounds.parties.ClientSide` of this kit's client alone, built from ``config``.

    Raises:
        ConfigError: the kit's client is not a client of the config's workload.
    """
    import torch

    from ..experiments.experiment import build_experiment, build_workload
    from ..rounds.client import Client
    from ..rounds.executors import InProcessExecutor
    from ..rounds.parties import ClientSide
    from ..rounds.server import clients_own_budget

    check_deployable(config)
    workload = build_workload(config)
    cid = kit.client_id
    if cid not in workload.clients:
        raise ConfigError(
            f"the kit's client {cid!r} is not a client of this config's workload (its clients: {sorted(workload.clients)[:10]}); "
            "provision the kits from this config"
        )
    description = replace(config, logging=replace(config.logging, jsonl=False, tensorboard=False, wandb=False, quiet=True))
    fed = build_experiment(description, workload=workload, channel=_Unreachable(), directory=kit.directory).federation
    own = {cid: Client(cid, workload.clients[cid])}
    # the workspace (with its initial local-only parameters) starts where a simulated Federation's does:
    # right after the initial model at the seed
    torch.manual_seed(fed.seed)
    workload.task.build_model()
    executor = InProcessExecutor(workload.task, device=fed.train.device)
    return ClientSide(
        clients=own,
        executor=executor,
        layout=fed.layout,
        pipeline=fed.pipeline,
        train=fed.train,
        update_kind=fed.strategy.update_kind,
        privacy=fed.sample_privacy,
        randomness=fed.randomness,
        budget=clients_own_budget(fed.budget, fed.sample_privacy),
        reveals=fed.reveals_models,
        state_folder=None if kit.folder is None else kit.folder / "state",
        identities={cid: kit.identity_key},
        directory=kit.directory,
    )


class PartyAnswer:
    """One client party's answer to each message the server streams to it.

    A TRAIN for a round the client already trained (the server restarted mid-round and sends it
    again) starts from the local-only parameters the client had before that round, as the resumed
    server starts from its checkpoint.
    """

    def __init__(self, side: Any, client_id: str) -> None:
        self.side = side
        self.client_id = client_id
        self._before: tuple[int, dict[str, Any]] | None = None

    def __call__(self, message: bytes) -> bytes | None:
        if msg.kind_of(message) == msg.Kind.TRAIN:
            t = int(msg.decode(message, expect=msg.Kind.TRAIN).header["round"])
            client = self.side.clients[self.client_id]
            if self._before is not None and self._before[0] == t:
                client.local_state = self._before[1]
            else:
                self._before = (t, client.local_state)
            log.info("%s: training for round %d", self.client_id, t)
        return self.side.handle_batch({self.client_id: message})[self.client_id]


def run_client(
    config: ExperimentConfig, *, kit: str | Path, server: str, limits: Limits | None = None, server_name: str | None = None
) -> None:
    """Run one client party until the server ends the run."""
    client_kit = ClientKit.load(kit)
    side = client_party(config, client_kit)
    log.info("%s: ready, attending %s", client_kit.client_id, server)
    ClientEndpoint(
        client_kit, server, answer=PartyAnswer(side, client_kit.client_id), limits=limits, server_name=server_name
    ).serve()
