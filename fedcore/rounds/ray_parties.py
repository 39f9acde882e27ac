"""Client parties on Ray actors: each actor hosts a group of them, and only message bytes cross.

Ray is optional (``pip install 'privfl[ray]'``); importing :mod:`fedcore` never imports it. Pass
``executor=RayParties(task)`` to a :class:`~fedcore.Federation` (config: ``executor = "ray"``).
Instead of one in-process :class:`~fedcore.rounds.parties.ClientSide`, every actor builds the client
parties of its group: their data, local-only parameters, identity keys, own randomness and an
in-process executor. The server party reaches them only through :class:`RayChannel`, whose
``exchange`` splits a batch of messages by the actor that hosts each recipient, hands every actor
its share at once (so the actors train in parallel) and merges the replies; what crosses is
``bytes`` (:mod:`fedcore.rounds.messages`, the secagg formats), recorded like the in-process channel's.

Set-up is the simulation operator's doing, not a party's: each actor receives its own clients'
data, the run's settings and the template model state once (every parameter and buffer,
including the initial values of local-only parameters), so that a client's result depends only
on the global model, its own state and its seed, never on where it runs: with ``reproducible=True``
Ray and in-process parties reach the same model bit for bit. Signed masking: each actor makes its
clients' identity keys and returns the public halves; the driver gives every actor the whole
directory (public keys only), which the server party reads too. Checkpoints: each actor writes
its clients' local-only parameters to the clients' folder beside the server's checkpoint, and
reads them back on resume; they never pass through the server party.

Refused: the HE modes (the key holder would have to hand each round's contexts to clients in other
actors without the server: the same limit as :mod:`fedcore.deploy`), and
``Federation.client_updates`` (simulation inspection needs in-process parties).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import ConfigError
from .client import Client, Workspace
from .executors import InProcessExecutor
from .parties import ClientSide, PartySettings, RecordingChannel

__all__ = ["RayParties", "RayChannel"]

INSTALL_HINT = "pip install 'privfl[ray]'"


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"RayParties needs Ray, which is not installed; install it with: {INSTALL_HINT}") from exc
    return ray


class _PartyActor:
    """Actor body: the client parties of one group, built here, answering the server's bytes."""

    def __init__(
        self, task: Any, clients: Mapping[str, Any], settings: PartySettings, template: dict[str, np.ndarray], device: str
    ) -> None:
        torch.set_num_threads(1)
        executor = InProcessExecutor(task, device=device)
        workspace: Workspace = executor.workspace
        workspace.model.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in template.items()})
        workspace.initial_local = workspace.layout.local_state(workspace.model)
        parties = {cid: Client(cid, data) for cid, data in clients.items()}
        self.side = ClientSide(clients=parties, executor=executor, **settings.as_kwargs())

    def directory(self) -> dict[str, bytes]:
        return dict(self.side.directory)

    def set_directory(self, directory: dict[str, bytes]) -> bool:
        self.side.set_directory(directory)
        return True

    def handle_batch(self, batch: dict[str, bytes]) -> dict[str, bytes | None]:
        return self.side.handle_batch(batch)

    def save_local_states(self, folder: str) -> bool:
        self.side.save_states(folder)
        return True

    def load_local_states(self, folder: str) -> bool:
        self.side.load_states(folder)  # the other clients' files belong to the other actors
        return True


class RayChannel(RecordingChannel):
    """The server party's channel to client parties hosted on Ray actors.

    Args:
        actors: the actor handles; ``hosts`` maps each client id to its actor's index.
        record: keep every byte the server receives in :attr:`inbox`.
    """

    def __init__(self, actors: list[Any], hosts: Mapping[str, int], *, record: bool = False) -> None:
        super().__init__(record=record)
        self.actors = list(actors)
        self.hosts = dict(hosts)

    def _deliver(self, batch: dict[str, bytes]) -> dict[str, bytes | None]:
        ray = _import_ray()
        shares: dict[int, dict[str, bytes]] = {}
        for recipient, message in batch.items():
            host = self.hosts.get(recipient)
            if host is None:
                raise ConfigError(f"a message for {recipient!r}, which no Ray actor hosts")
            shares.setdefault(host, {})[recipient] = message
        pending = [self.actors[host].handle_batch.remote(share) for host, share in shares.items()]
        replies: dict[str, bytes | None] = {}
        for part in ray.get(pending):
            replies.update(part)
        return replies

    def save_local_states(self, folder: Path) -> None:
        """Each actor writes its clients' local-only parameters to ``folder`` (the clients' side)."""
        _import_ray().get([a.save_local_states.remote(str(folder)) for a in self.actors])

    def load_local_states(self, folder: Path) -> None:
        """Each actor reads its clients' local-only parameters back from ``folder``."""
        _import_ray().get([a.load_local_states.remote(str(folder)) for a in self.actors])


class RayParties:
    """Hosts a federation's client parties on Ray actors (pass as ``Federation(executor=...)``).

    Args:
        task: the workload (each actor builds its workspace from it).
        device: torch device of the actors' workspaces.
        num_actors: actors, each hosting about ``clients / num_actors`` clients (None: as many
            as Ray's free CPUs, at least one).
        address: ``None`` starts (or reuses) a local Ray instance; ``"auto"`` or
            ``"ray://host:10001"`` reaches an existing cluster.
        init_kwargs: further ``ray.init`` arguments (e.g. ``num_cpus=2``) when Ray is started here.

    Raises:
        ImportError: Ray is not installed (with the install command).
        ConfigError: a setting out of range.
    """

    name = "ray"

    def __init__(
        self,
        task: Any,
        *,
        device: str = "cpu",
        num_actors: int | None = None,
        address: str | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        ray = _import_ray()
        if num_actors is not None and (isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1):
            raise ConfigError(f"num_actors must be an int >= 1 or None, got {num_actors!r}")
        try:
            torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"device must name a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
        self.task = task
        self.device = device
        self.num_actors = num_actors
        self._owns_ray = False
        if not ray.is_initialized():
            ray.init(address=address, **dict(init_kwargs or {}))
            self._owns_ray = True
        self._workspace: Workspace | None = None
        self._actors: list[Any] = []

    @property
    def workspace(self) -> Workspace:
        """The template workspace, built when the federation builds an in-process one (same RNG point)."""
        if self._workspace is None:
            self._workspace = Workspace(self.task, device="cpu")
        return self._workspace

    def host(
        self, clients: Mapping[str, Client], settings: PartySettings, *, record: bool
    ) -> tuple[RayChannel, dict[str, bytes]]:
        """Start the actors with their groups of ``clients``; the channel to them and the public directory."""
        ray = _import_ray()
        if hasattr(settings.pipeline.backend, "key_holder_session"):
            raise ConfigError(
                f"aggregation mode {settings.pipeline.backend.mode!r} needs an HE key holder that hands each client its "
                "context directly, which Ray parties cannot do yet; use plaintext or masked aggregation, or the in-process executor"
            )
        self.shutdown_actors()
        ids = sorted(clients)
        count = min(len(ids), self.num_actors or max(1, int(ray.available_resources().get("CPU", 1))))
        groups = [ids[i::count] for i in range(count)]
        template = ray.put({k: v.detach().cpu().numpy() for k, v in self.workspace.model.state_dict().items()})
        task, shared = ray.put(self.task), ray.put(settings)
        actor = ray.remote(num_cpus=0)(_PartyActor)
        self._actors = [
            actor.remote(task, {cid: clients[cid].data for cid in group}, shared, template, self.device) for group in groups
        ]
        directory: dict[str, bytes] = {}
        for part in ray.get([a.directory.remote() for a in self._actors]):
            directory.update(part)
        if directory:
            ray.get([a.set_directory.remote(directory) for a in self._actors])
        hosts = {cid: i for i, group in enumerate(groups) for cid in group}
        return RayChannel(self._actors, hosts, record=record), directory

    def shutdown_actors(self) -> None:
        """Stop the actors of the last federation hosted here."""
        ray = _import_ray()
        for a in self._actors:
            ray.kill(a)
        self._actors = []

    def shutdown(self) -> None:
        """Stop the actors (and Ray itself, if it was started here)."""
        self.shutdown_actors()
        ray = _import_ray()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    def describe(self) -> dict[str, Any]:
        """Where the client parties run: actors, device, and the cluster's resources."""
        ray = _import_ray()
        return {
            "executor": self.name,
            "actors": len(self._actors) or self.num_actors,
            "device": self.device,
            "cluster_resources": dict(ray.cluster_resources()) if ray.is_initialized() else {},
        }

    def __enter__(self) -> "RayParties":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
