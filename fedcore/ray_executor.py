"""The Ray executor: clients' local work runs on Ray actors, on one machine or a cluster.

Ray is optional (``pip install 'privfl[ray]'``); importing :mod:`fedcore` never imports it. The
driver keeps the server and protocol state (global model, pipeline, strategy, ledger, each
client's local-only parameters); actors only train and evaluate. Each actor holds one model
workspace cloned from the driver's template (every parameter and buffer, including the initial
values of local-only parameters), so a client's result depends only on the global vector, its
local state and its seed, never on which actor ran it: a synchronous run on Ray reaches the same
model as the in-process executor under the same seed.

What moves where: the global vector goes to the object store once per call of :meth:`fit`; each
client's data goes there once (the executor caches the reference, each actor the data it read);
local-only parameters travel to the actor with each job and come back with the result, to be
kept in the driver's ``Client.local_state`` (so checkpoints keep working). Clients are sent in
batches (several clients per actor call, two calls queued per actor), which keeps Ray's
per-call cost small against short local jobs. Ray serializes with cloudpickle between the
driver and the workers it started: one operator's simulation or cluster, not a boundary
between parties.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .client import Client, ClientResult, Workspace
from .errors import ConfigError
from .task import ClientData, Task
from .training import SampleLevelPrivacy, TrainConfig

__all__ = ["RayExecutor"]

INSTALL_HINT = "pip install 'privfl[ray]'"
_QUEUED_PER_ACTOR = 2
_BATCHES_PER_ACTOR = 4


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"RayExecutor needs Ray, which is not installed; install it with: {INSTALL_HINT}") from exc
    return ray


def _to_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _to_torch(state: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}


def _vector(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


class _Worker:
    """Actor body: one workspace, cloned from the driver's template model state.

    A job is ``(client_id, [data_ref], local_state)``; the data reference is wrapped in a list so
    that Ray passes it unresolved and the actor fetches (and caches) each client's data once.
    """

    def __init__(self, task: Task, device: str, template: dict[str, np.ndarray], threads: int | None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.workspace = Workspace(task, device=device)
        self._data: dict[str, ClientData] = {}
        self.load_template(template)

    def load_template(self, template: dict[str, np.ndarray]) -> bool:
        """Make this workspace a clone of the driver's (every parameter and buffer); forget cached data."""
        self._data = {}
        self.workspace.model.load_state_dict(_to_torch(template))
        self.workspace.initial_local = self.workspace.layout.local_state(self.workspace.model)
        return True

    def _clients(self, jobs: list[tuple[str, list[Any], dict[str, np.ndarray]]]) -> list[Client]:
        missing = {ref[0].hex(): ref[0] for _, ref, _ in jobs if ref[0].hex() not in self._data}
        if missing:
            values = _import_ray().get(list(missing.values()))
            self._data.update(zip(missing, values))
        clients = []
        for client_id, ref, local_state in jobs:
            client = Client(client_id, self._data[ref[0].hex()])
            client.local_state = _to_torch(local_state)
            clients.append(client)
        return clients

    def fit(
        self,
        jobs: list[tuple[str, list[Any], dict[str, np.ndarray]]],
        seeds: list[int],
        global_vector: np.ndarray,
        config: TrainConfig,
        round_index: int,
        update_kind: str,
        privacy: SampleLevelPrivacy | None,
    ) -> list[tuple[ClientResult, dict[str, np.ndarray]]]:
        vector = _vector(global_vector)
        out = []
        for client, seed in zip(self._clients(jobs), seeds):
            result = client.fit(
                self.workspace, global_vector=vector, config=config, seed=seed, round_index=round_index,
                update_kind=update_kind, privacy=privacy,
            )  # fmt: skip
            out.append((result, _to_numpy(client.local_state)))
        return out

    def evaluate(
        self, jobs: list[tuple[str, list[Any], dict[str, np.ndarray]]], global_vector: np.ndarray, split: str
    ) -> list[tuple[dict[str, float], int]]:
        vector = _vector(global_vector)
        return [c.evaluate(self.workspace, global_vector=vector, split=split) for c in self._clients(jobs)]

    def predict(
        self, jobs: list[tuple[str, list[Any], dict[str, np.ndarray]]], vector: np.ndarray, batch: Any
    ) -> list[torch.Tensor]:
        weights = _vector(vector)
        return [c.predict(self.workspace, vector=weights, batch=batch).cpu() for c in self._clients(jobs)]


class RayExecutor:
    """Runs clients' local work on a pool of Ray actors (implements :class:`~fedcore.Executor`).

    Args:
        task: the workload (sent to each actor once).
        device: torch device of the actors' workspaces, chosen explicitly (``"cuda:0"`` inside an
            actor is the GPU Ray assigned to it).
        num_workers: actors in the pool (None: as many as the cluster's free CPUs and GPUs allow
            at ``num_cpus_per_client`` / ``num_gpus_per_client`` each, at least one).
        num_cpus_per_client: CPUs each actor reserves (an actor runs one client at a time).
        num_gpus_per_client: GPUs each actor reserves (fractions share a GPU).
        address: ``None`` starts (or reuses) a local Ray instance; ``"auto"`` or
            ``"ray://host:10001"`` reaches an existing cluster through ``ray.init(address=...)``.
        init_kwargs: further ``ray.init`` arguments (e.g. ``num_cpus=2``, ``runtime_env``) when
            this executor starts Ray.
        torch_threads: intra-op threads per actor (None: Ray's default, one per reserved CPU).
        clients_per_call: clients per actor call (None: a round's clients split into about four
            calls per actor, so that fast actors take more).

    Raises:
        ImportError: Ray is not installed (with the install command).
        ConfigError: a setting out of range.
    """

    name = "ray"

    def __init__(
        self,
        task: Task,
        *,
        device: str = "cpu",
        num_workers: int | None = None,
        num_cpus_per_client: float = 1.0,
        num_gpus_per_client: float = 0.0,
        address: str | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
        torch_threads: int | None = None,
        clients_per_call: int | None = None,
    ) -> None:
        ray = _import_ray()
        for label, value in (
            ("num_workers", num_workers),
            ("torch_threads", torch_threads),
            ("clients_per_call", clients_per_call),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{label} must be an int >= 1 or None, got {value!r}")
        for label, amount in (("num_cpus_per_client", num_cpus_per_client), ("num_gpus_per_client", num_gpus_per_client)):
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) or amount < 0:
                raise ConfigError(f"{label} must be a number >= 0, got {amount!r}")
        if num_cpus_per_client == 0 and num_gpus_per_client == 0 and num_workers is None:
            raise ConfigError("with num_cpus_per_client=0 and num_gpus_per_client=0, give num_workers explicitly")
        try:
            torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"device must name a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
        self.task = task
        self.device = device
        self.num_cpus_per_client = float(num_cpus_per_client)
        self.num_gpus_per_client = float(num_gpus_per_client)
        self.torch_threads = torch_threads
        self.clients_per_call = clients_per_call
        self._owns_ray = False
        if not ray.is_initialized():
            ray.init(address=address, **dict(init_kwargs or {}))
            self._owns_ray = True
        self._requested_workers = num_workers
        self._workspace: Workspace | None = None
        self._actors: list[Any] = []
        self._template_sent = False
        self._data_refs: dict[str, tuple[ClientData, Any]] = {}

    # ------------------------------------------------------------------ pool
    @property
    def workspace(self) -> Workspace:
        """The driver's template workspace, built at first use (or when first read).

        The in-process executor's workspace is built by the federation right after its seeded
        global model; building this one then too (at the first round, or by reading this
        property right after building the federation) makes local-only parameters start from
        the same values on both executors.
        """
        if self._workspace is None:
            self._workspace = Workspace(self.task, device="cpu")
        return self._workspace

    def reset(self) -> None:
        """Rebuild the template at next use, for a new federation reusing this executor's actors."""
        self._workspace = None
        self._template_sent = False
        self._data_refs = {}

    @property
    def num_workers(self) -> int:
        """Actors in the pool (started at first use)."""
        return len(self._pool())

    def _default_workers(self) -> int:
        free = _import_ray().available_resources()
        counts = []
        if self.num_cpus_per_client > 0:
            counts.append(int(free.get("CPU", 0) // self.num_cpus_per_client))
        if self.num_gpus_per_client > 0:
            counts.append(int(free.get("GPU", 0) // self.num_gpus_per_client))
        return max(1, min(counts))

    def _pool(self) -> list[Any]:
        ray = _import_ray()
        if not self._actors:
            count = self._requested_workers or self._default_workers()
            template_ref = ray.put(_to_numpy(self.workspace.model.state_dict()))
            actor = ray.remote(num_cpus=self.num_cpus_per_client, num_gpus=self.num_gpus_per_client)(_Worker)
            task_ref = ray.put(self.task)
            self._actors = [actor.remote(task_ref, self.device, template_ref, self.torch_threads) for _ in range(count)]
            self._template_sent = True
        elif not self._template_sent:
            template_ref = ray.put(_to_numpy(self.workspace.model.state_dict()))
            ray.get([a.load_template.remote(template_ref) for a in self._actors])
            self._template_sent = True
        return self._actors

    def _job(self, client: Client) -> tuple[str, list[Any], dict[str, np.ndarray]]:
        cached = self._data_refs.get(client.client_id)
        if cached is None or cached[0] is not client.data:
            cached = self._data_refs[client.client_id] = (client.data, _import_ray().put(client.data))
        return client.client_id, [cached[1]], _to_numpy(client.local_state)

    def _batches(self, n: int) -> list[range]:
        size = self.clients_per_call or max(1, math.ceil(n / (_BATCHES_PER_ACTOR * len(self._pool()))))
        return [range(start, min(start + size, n)) for start in range(0, n, size)]

    def _map(self, method: str, clients: Sequence[Client], per_client: Sequence[Any] | None, *shared: Any) -> list[Any]:
        """Run ``method`` over the clients in batches on free actors; results in the clients' order."""
        ray = _import_ray()
        actors = self._pool()
        batches = self._batches(len(clients))
        slots = [i for i in range(len(actors)) for _ in range(_QUEUED_PER_ACTOR)]
        running: dict[Any, tuple[range, int]] = {}
        results: list[Any] = [None] * len(clients)
        position = 0
        try:
            while position < len(batches) or running:
                while slots and position < len(batches):
                    slot, batch = slots.pop(0), batches[position]
                    jobs = [self._job(clients[i]) for i in batch]
                    args = (jobs,) if per_client is None else (jobs, [per_client[i] for i in batch])
                    running[getattr(actors[slot], method).remote(*args, *shared)] = (batch, slot)
                    position += 1
                done, _ = ray.wait(list(running), num_returns=1)
                for ref in done:
                    batch, slot = running.pop(ref)
                    for i, value in zip(batch, ray.get(ref)):
                        results[i] = value
                    slots.append(slot)
        except BaseException:
            for ref in running:
                ray.cancel(ref)
            raise
        return results

    # ------------------------------------------------------------------ Executor
    def fit(
        self,
        clients: Sequence[Client],
        *,
        global_vector: torch.Tensor,
        config: TrainConfig,
        seeds: Sequence[int],
        round_index: int,
        update_kind: str,
        privacy: SampleLevelPrivacy | None,
    ) -> list[ClientResult]:
        """Train ``clients`` in parallel; write their new local-only parameters back to the driver."""
        if len(seeds) != len(clients):
            raise ConfigError(f"seeds must hold one seed per client ({len(clients)}), got {len(seeds)}")
        if not clients:
            return []
        vector_ref = _import_ray().put(global_vector.detach().cpu().numpy())
        out = self._map("fit", clients, [int(s) for s in seeds], vector_ref, config, round_index, update_kind, privacy)
        results = []
        for client, (result, local_state) in zip(clients, out):
            client.local_state = _to_torch(local_state)
            results.append(result)
        return results

    def evaluate(
        self, clients: Sequence[Client], *, global_vector: torch.Tensor, split: str
    ) -> list[tuple[dict[str, float], int]]:
        """Evaluate clients in parallel on the Ray actors; one entry per client, in order."""
        if not clients:
            return []
        vector_ref = _import_ray().put(global_vector.detach().cpu().numpy())
        return self._map("evaluate", clients, None, vector_ref, split)

    def predict(self, client: Client, *, vector: torch.Tensor, batch: Any) -> torch.Tensor:
        """Predict on a Ray actor with the client's local-only parameters and ``vector``."""
        return self._map("predict", [client], None, vector.detach().cpu().numpy(), batch)[0]

    # ------------------------------------------------------------------ lifecycle
    def describe(self) -> dict[str, Any]:
        """Where clients run: the actor count, resources per client, device, and the cluster."""
        ray = _import_ray()
        return {
            "executor": self.name,
            "workers": len(self._actors) or self._requested_workers,
            "num_cpus_per_client": self.num_cpus_per_client,
            "num_gpus_per_client": self.num_gpus_per_client,
            "device": self.device,
            "clients_per_call": self.clients_per_call or "auto",
            "cluster_resources": dict(ray.cluster_resources()) if ray.is_initialized() else {},
        }

    def shutdown(self) -> None:
        """Stop the actors (and Ray itself, if this executor started it)."""
        ray = _import_ray()
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        self._template_sent = False
        self._data_refs = {}
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
