"""Client parties, and the channel that is the server party's only way to reach them.

A client party holds its data, its local-only parameters, its identity key, its HE client context
(where the mode gives it one) and its own randomness; after local training it keeps the update,
runs the client half of the pipeline on it (clip, staleness and example weights) and gives the
result only to its own protection session (:mod:`secagg.session`), which turns it into protocol
bytes. The server party (:class:`~fedcore.rounds.server.Federation`) holds no reference to any client
party: it builds messages (:mod:`fedcore.rounds.messages`, secagg formats) and hands them to a
:class:`Channel`, which returns the replies as bytes. What the server received is in its
``inbox`` when the channel records it (tests and notebook 02 read it).

The HE key holder (``secagg.KEY_HOLDER``) is a party of its own on the client side: it makes
fresh keys every round (CKKS flooding is sized for one decryption per key set), gives each client
its context directly (never through the server) and answers only the server's request to decrypt
that round's aggregate.

Randomness (:class:`Randomness`): by default every seed a client uses (training shuffles,
DP-SGD noise, stochastic rounding, distributed noise) is drawn fresh from the operating system
(``secrets``), so neither the server nor anyone who reads the run's config can recompute it.
A reproducible simulation derives them from the simulation seed instead; the privacy report then
says that the noise is derivable from that seed.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import torch

import dp
from secagg import KEY_HOLDER, ClientKeys, ClientSession, ProtocolError

from ..errors import ConfigError
from ..stages.layout import ParameterLayout
from ..stages.pipeline import UpdatePipeline
from . import messages as msg
from .checkpoint import load_client_ledger, load_client_ledgers, load_local_states, save_client_ledger, save_local_state
from .client import Client, ClientResult, check_results
from .executors import Executor
from .training import SampleLevelPrivacy, TrainConfig

__all__ = [
    "Randomness",
    "PartySettings",
    "PartyHost",
    "ClientSide",
    "Channel",
    "RecordingChannel",
    "InProcessChannel",
    "Received",
]


class Randomness:
    """Where client parties (and the server's own noise) draw their seeds from.

    Args:
        simulation_seed: None (default): every seed comes fresh from the OS CSPRNG. An int: a
            reproducible simulation; every seed is derived from it, the round, the party and
            the purpose, and whoever knows it can recompute all noise.
    """

    def __init__(self, simulation_seed: int | None = None) -> None:
        if simulation_seed is not None and (isinstance(simulation_seed, bool) or not isinstance(simulation_seed, int)):
            raise ConfigError(f"simulation_seed must be an int or None, got {simulation_seed!r}")
        self.simulation_seed = simulation_seed

    @property
    def reproducible(self) -> bool:
        """Whether every seed is derivable from the simulation seed."""
        return self.simulation_seed is not None

    def seed(self, *, round_index: int, party: str, purpose: str) -> int:
        """A 63-bit seed for one party's work of one kind in one round."""
        if self.simulation_seed is None:
            return secrets.randbits(63)
        label = f"{self.simulation_seed}/{round_index}/{party}/{purpose}".encode()
        return int.from_bytes(hashlib.sha256(label).digest()[:8], "little") >> 1

    def generator(self, *, round_index: int, party: str, purpose: str) -> np.random.Generator:
        """A numpy generator: 128 bits from the OS, or derived from the simulation seed."""
        if self.simulation_seed is None:
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng(self.seed(round_index=round_index, party=party, purpose=purpose))


HELD_OUT_SPLITS = ("validation", "test")
"""The splits a client scores the global model on when the server asks (never its training data)."""


@dataclass(frozen=True)
class PartySettings:
    """What every client party of a federation is built with, besides its own data and executor."""

    layout: ParameterLayout
    pipeline: UpdatePipeline
    train: TrainConfig
    update_kind: str
    privacy: SampleLevelPrivacy | None
    randomness: Randomness
    client_deadline: float | None = None
    budget: dp.PrivacyBudget | None = None
    state_folder: Path | None = None
    reveals: bool = False

    def as_kwargs(self) -> dict[str, Any]:
        """The settings as :class:`ClientSide` keyword arguments."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def planned_sample_event(
    privacy: dp.SampleLevelDP, train: TrainConfig, *, client_id: str, round_index: int, num_examples: int, clipping: str
) -> dp.SampleLevelEvent:
    """The DP-SGD run a client holding ``num_examples`` makes in one round, every planned step taken.

    What the server plans a round's budget with and what a client checks its own budget with before
    it trains (early stopping only spends less).
    """
    steps, sample_rate = train.dp_schedule(num_examples)
    return dp.SampleLevelEvent(
        client_id=client_id,
        round_index=round_index,
        noise_multiplier=privacy.noise(),
        max_grad_norm=privacy.max_grad_norm,
        sample_rate=sample_rate,
        steps=steps,
        clipping=clipping,
        sampling="poisson" if privacy.poisson_sampling else "fixed_size",
        unit=privacy.unit,
    )


@dataclass
class _Pending:
    """A client's trained update, waiting for the server's PROTECT or REVEAL."""

    round_index: int
    result: ClientResult
    local_after: dict[str, torch.Tensor] | None = None
    session: ClientSession | None = None
    released: bool = False


class ClientSide:
    """Every client party of a simulation (and the HE key holder), answering the server's bytes.

    Local training of a batch of TRAIN messages runs through one executor call, so a parallel
    executor (Ray) trains the batch together; everything else a client does happens here, in the
    client parties, out of the server's reach.

    By default each client makes its own identity key here. A deployed client process (see
    :mod:`fedcore.deploy`) passes the one provisioned into its kit instead: ``identities`` (its
    Ed25519 private key by client id) and ``directory`` (every client's public key).

    ``reveals``: whether the run's strategy reveals local models in the clear (model selection and
    ensembles, plaintext mode, with consent); otherwise a REVEAL is refused, whatever the server says.

    ``budget`` (sample level): each client keeps its own ledger of the DP-SGD runs whose updates
    it released (PROTECT or REVEAL) and refuses, before training, a round whose planned run would
    take its own epsilon over the budget: a server that forgets its ledger, or restores an earlier
    checkpoint on purpose and asks again, gets no more updates than the budget allows from any
    client. What a client reports besides (training and evaluation metrics) is listed in the
    report as non-private releases and is not limited by it.
    With ``state_folder`` (the clients' disk) a client writes its ledger there as it releases and
    reads it back when it starts, so that neither a crash nor a restart loses it; :meth:`load_states`
    adds what another folder holds, never removing an event.
    """

    def __init__(
        self,
        *,
        clients: Mapping[str, Client],
        executor: Executor,
        layout: ParameterLayout,
        pipeline: UpdatePipeline,
        train: TrainConfig,
        update_kind: str,
        privacy: SampleLevelPrivacy | None,
        randomness: Randomness,
        client_deadline: float | None = None,
        budget: dp.PrivacyBudget | None = None,
        state_folder: Path | None = None,
        reveals: bool = False,
        identities: Mapping[str, Any] | None = None,
        directory: Mapping[str, bytes] | None = None,
    ) -> None:
        if (identities is None) != (directory is None):
            raise ConfigError("identities (the clients' private identity keys) and directory (every public key) go together")
        self.clients = dict(clients)
        self.executor = executor
        self.layout = layout
        self.pipeline = pipeline
        self.train = train
        self.update_kind = update_kind
        self.privacy = privacy
        self.randomness = randomness
        self.client_deadline = client_deadline
        if budget is not None and budget.level != "sample":
            raise ConfigError(
                f"a client's own budget covers its sample-level (DP-SGD) releases: level must be 'sample', got {budget.level!r}"
            )
        self.budget = budget
        self.state_folder = state_folder
        self.reveals = reveals
        # per client, the sample-level events of the updates it released: its own account, not the server's
        self.spent: dict[str, dp.Ledger] = {cid: dp.Ledger() for cid in self.clients}
        if state_folder is not None:  # a client restarted on its disk keeps its account
            self._merge_ledgers(state_folder)
        self._pending: dict[str, _Pending] = {}
        self._keys: dict[str, ClientKeys] = {}
        self.key_holder: Any = None
        self.directory: dict[str, bytes] = {}
        self._provision(identities, directory)

    # ------------------------------------------------------------------ set-up
    def _provision(self, identities: Mapping[str, Any] | None, directory: Mapping[str, bytes] | None) -> None:
        """Each client makes its own identity key (or takes its provisioned one); the HE key holder makes the HE keys.

        The server gets the public halves only: :attr:`directory` (Ed25519 public keys) and
        each round's HE public context (see :meth:`_new_round_keys`).
        """
        backend = self.pipeline.backend
        signed = bool(getattr(backend, "signed_keys", False))
        private: dict[str, Any] = {}
        if signed and identities is not None and directory is not None:
            missing = sorted(set(self.clients) - set(identities))
            if missing:
                raise ConfigError(f"identities must hold every client's identity key, lacks {missing[:5]}")
            private = {cid: identities[cid] for cid in self.clients}
            self.directory = {cid: bytes(key) for cid, key in directory.items()}
        elif signed:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
            from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

            for cid in self.clients:
                private[cid] = Ed25519PrivateKey.generate()
                self.directory[cid] = private[cid].public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        for cid in self.clients:
            self._keys[cid] = ClientKeys(identity_key=private.get(cid), peer_identities=dict(self.directory) if signed else None)

    def set_directory(self, directory: Mapping[str, bytes]) -> None:
        """Take the whole federation's identity public keys (parties hosted in several groups).

        Raises:
            ProtocolError: the directory lacks one of this group's clients or gives it another key.
        """
        signed = bool(getattr(self.pipeline.backend, "signed_keys", False))
        if not signed:
            return
        for cid in self.clients:
            if bytes(directory.get(cid, b"")) != self.directory[cid]:
                raise ProtocolError(f"the directory gives client {cid!r} a key it did not make (or none)")
        self.directory = {cid: bytes(key) for cid, key in directory.items()}
        for cid, keys in self._keys.items():
            self._keys[cid] = replace(keys, peer_identities=dict(self.directory))

    def _new_round_keys(self, decoded: msg.Message) -> bytes:
        """The HE key holder makes this round's keys; each client gets its context from it directly.

        Returns the public context, the only part the server receives.
        """
        make = getattr(self.pipeline.backend, "key_holder_session", None)
        if make is None:
            raise ProtocolError(f"mode {self.pipeline.backend.mode!r} has no key holder")
        self.key_holder = make(round_index=int(decoded.header["round"]))
        for cid, keys in self._keys.items():
            self._keys[cid] = replace(keys, he_context=self.key_holder.client_context(cid))
        return bytes(self.key_holder.server_context())

    # ------------------------------------------------------------------ messages
    def handle_batch(self, batch: Mapping[str, bytes]) -> dict[str, bytes | None]:
        """Deliver a batch of messages by recipient; return each recipient's reply."""
        replies: dict[str, bytes | None] = {}
        kinds = {r: msg.kind_of(m) for r, m in batch.items()}  # the envelope only: TRAIN payloads are parsed once, below
        train = {r: m for r, m in batch.items() if kinds[r] == msg.Kind.TRAIN}
        if train:
            replies.update(self._train(train))
        scoring = {r: m for r, m in batch.items() if kinds[r] == msg.Kind.EVALUATE}
        if scoring:
            replies.update(self._evaluate(scoring))
        for recipient, message in batch.items():
            if recipient not in train and recipient not in scoring:
                replies[recipient] = self.handle(recipient, message)
        return replies

    def handle(self, recipient: str, message: bytes) -> bytes | None:
        """One message to one party (not TRAIN, which goes through :meth:`handle_batch`)."""
        if recipient == KEY_HOLDER:
            if msg.is_fedcore_message(message):
                return self._new_round_keys(msg.decode(message, expect=msg.Kind.KEYS))
            if self.key_holder is None:
                raise ProtocolError("a message for the key holder before it made any keys")
            return self.key_holder.handle(message)
        if recipient not in self.clients:
            raise ProtocolError(f"a message for {recipient!r}, which is no client of this federation")
        if not msg.is_fedcore_message(message):
            pending = self._pending.get(recipient)
            if pending is None or pending.session is None:
                raise ProtocolError(f"client {recipient!r} got a protocol message outside a protection round")
            return pending.session.handle(message)
        decoded = msg.decode(message)
        if decoded.kind == msg.Kind.FINISH:
            return self._finish(recipient, decoded)
        if decoded.kind == msg.Kind.PROTECT:
            return self._protect(recipient, decoded)
        if decoded.kind == msg.Kind.REVEAL:
            return self._reveal(recipient, decoded)
        if decoded.kind == msg.Kind.EVALUATE:
            return self._evaluate({recipient: message})[recipient]
        raise msg.MessageError(f"client {recipient!r} cannot answer a {decoded.kind.name} message")

    def _train(self, batch: Mapping[str, bytes]) -> dict[str, bytes]:
        by_version: dict[tuple[int, int], list[str]] = {}  # one executor call per (round, model version)
        decoded = {cid: msg.decode(m, expect=msg.Kind.TRAIN) for cid, m in batch.items()}
        for cid, d in decoded.items():
            if cid not in self.clients:
                raise ProtocolError(f"a TRAIN message for {cid!r}, which is no client of this federation")
            by_version.setdefault((int(d.header["round"]), int(d.header["version"])), []).append(cid)
        replies: dict[str, bytes] = {}
        for (t, _version), asked in by_version.items():
            refused = {cid: why for cid in asked if (why := self._over_budget(cid, t)) is not None}
            for cid, why in refused.items():  # refused before training: no update, no metrics
                self._pending.pop(cid, None)
                replies[cid] = msg.encode(
                    msg.Kind.TRAIN_REPORT,
                    {"round": t, "client": cid, "ok": False, "error": why, "train_seconds": 0.0, "steps": 0, "metrics": {},
                     "privacy_event": None, "budget_refused": True},
                )  # fmt: skip
            ids = [cid for cid in asked if cid not in refused]
            if not ids:
                continue
            vector = torch.from_numpy(decoded[ids[0]].payload)
            jobs = [int(decoded[c].header.get("job", t)) for c in ids]
            clients = [self.clients[c] for c in ids]
            before = [c.local_state for c in clients]
            results = self.executor.fit(
                clients,
                global_vector=vector,
                config=self.train,
                seeds=[self.randomness.seed(round_index=j, party=c, purpose="train") for c, j in zip(ids, jobs)],
                round_index=t,
                update_kind=self.update_kind,
                privacy=self.privacy,
            )
            after: list[dict[str, torch.Tensor] | None] = [None] * len(ids)
            for i, cid in enumerate(ids):
                if decoded[cid].header.get("defer_local"):  # a simulation computing a job before it ends
                    after[i], clients[i].local_state = clients[i].local_state, before[i]
            check_results(results, participants=ids, dimension=vector.numel(), round_index=t)
            for cid, result, local_after in zip(ids, results, after):
                late = self.client_deadline is not None and result.train_seconds > self.client_deadline
                error = result.error or (f"missed the deadline of {self.client_deadline} s" if late else None)
                ok = error is None
                if ok:
                    self._pending[cid] = _Pending(t, result, local_after)
                else:
                    self._pending.pop(cid, None)
                event = result.privacy_event
                replies[cid] = msg.encode(
                    msg.Kind.TRAIN_REPORT,
                    {
                        "round": t,
                        "client": cid,
                        "ok": ok,
                        "error": error,
                        "train_seconds": float(result.train_seconds),
                        "steps": int(result.steps),
                        "metrics": {k: float(v) for k, v in result.metrics.items() if math.isfinite(float(v))},
                        "privacy_event": None if event is None else dp.event_to_dict(event),
                    },
                )
        return replies

    def _over_budget(self, cid: str, t: int) -> str | None:
        """Why ``cid`` refuses to train for round ``t`` (its planned run would exceed its own budget), or None."""
        if self.budget is None or not isinstance(self.privacy, dp.SampleLevelDP):
            return None
        # the clipping mode does not enter the accounting; this planned event is checked, never recorded
        clipping = "default" if self.privacy.clipping == "auto" else self.privacy.clipping
        planned = planned_sample_event(
            self.privacy,
            self.train,
            client_id=cid,
            round_index=t,
            num_examples=self.clients[cid].data.num_train,
            clipping=clipping,
        )
        try:
            self.budget.check(self.spent[cid], [planned], what=f"client {cid!r}'s update of round {t}")
        except dp.BudgetExceededError as exc:
            return f"refused by the client: {exc}"
        return None

    def _release(self, cid: str, pending: _Pending) -> None:
        """The update leaves the client now (masked, encrypted or plain): its own ledger records it, once."""
        if not pending.released and pending.result.privacy_event is not None:
            if self.state_folder is not None:  # what another party object on this disk wrote meanwhile stays
                self._merge(cid, load_client_ledger(self.state_folder, cid))
            self.spent[cid].record(pending.result.privacy_event)
            if self.state_folder is not None:
                save_client_ledger(self.state_folder, cid, self.spent[cid].to_json())
        pending.released = True

    def save_states(self, folder: str | Path) -> None:
        """Each client's own files in ``folder`` (its disk): its local-only parameters and its own ledger."""
        self._merge_ledgers(folder)  # a ledger file never ends up shorter than it was
        for cid, client in self.clients.items():
            if client.local_state:
                save_local_state(folder, cid, {k: t.detach().cpu().numpy() for k, t in client.local_state.items()})
            if self.spent[cid].events:
                save_client_ledger(folder, cid, self.spent[cid].to_json())

    def load_states(self, folder: str | Path) -> None:
        """Read back what :meth:`save_states` wrote for this party's clients (files of other clients are theirs).

        A client's ledger never shrinks: events it already holds stay, those in the file are added,
        so restoring an older folder cannot make a client forget an update it released.
        """
        for cid, params in load_local_states(folder).items():
            if cid in self.clients:
                self.clients[cid].local_state = {k: torch.from_numpy(v.copy()) for k, v in params.items()}
        self._merge_ledgers(folder)

    def _merge_ledgers(self, folder: str | Path) -> None:
        """Add the clients' ledgers saved in ``folder`` to what they hold (see :meth:`_merge`)."""
        for cid, text in load_client_ledgers(folder).items():
            if cid in self.clients:
                self._merge(cid, text)

    def _merge(self, cid: str, text: str | None) -> None:
        """Add a saved ledger of ``cid`` to what it holds, as multisets: never fewer events than either."""
        if text is None:
            return
        held = self.spent[cid]
        for event in (Counter(dp.Ledger.from_json(text).events) - Counter(held.events)).elements():
            held.record(event)

    def _finish(self, cid: str, decoded: msg.Message) -> bytes:
        """The simulated job ended: a deferred local state takes effect now."""
        pending = self._pending.get(cid)
        if pending is not None and pending.local_after is not None:
            self.clients[cid].local_state, pending.local_after = pending.local_after, None
        return msg.encode(msg.Kind.ACK, {"round": int(decoded.header["round"]), "client": cid})

    def _protect(self, cid: str, decoded: msg.Message) -> bytes:
        pending = self._pending.get(cid)
        t = int(decoded.header["round"])
        if pending is None:
            raise ProtocolError(f"client {cid!r} was asked to protect an update it does not have (round {t})")
        participants = [str(p) for p in decoded.header["participants"]]
        if cid not in participants:
            raise ProtocolError(f"client {cid!r} was asked to protect in a round that does not list it")
        vector = self.pipeline.prepare(
            pending.result.update,
            num_examples=pending.result.num_examples,
            staleness_weight=float(decoded.header["staleness_weight"]),
            clip_bound=decoded.header.get("clip_bound"),
        )
        session = self.pipeline.backend.client_session(
            cid,
            round_index=t,
            participants=participants,
            rng=self.randomness.generator(round_index=t, party=cid, purpose="protect"),
            keys=self._keys[cid],
        )
        session.set_input(vector)
        pending.session = session
        self._release(cid, pending)
        return msg.encode(msg.Kind.ACK, {"round": t, "client": cid})

    def _reveal(self, cid: str, decoded: msg.Message) -> bytes:
        pending = self._pending.get(cid)
        if pending is None:
            raise ProtocolError(f"client {cid!r} was asked to reveal an update it does not have")
        if not self.reveals:
            raise ProtocolError(
                f"client {cid!r} refuses to reveal its update: this run's strategy does not reveal local models "
                f"(mode {self.pipeline.backend.mode!r}); its updates leave it only through the protection pipeline"
            )
        self._release(cid, pending)
        result = pending.result
        return msg.encode(
            msg.Kind.REVEALED,
            {
                "round": int(decoded.header["round"]),
                "client": cid,
                "num_examples": float(result.num_examples),
                "metrics": {k: float(v) for k, v in result.metrics.items() if math.isfinite(float(v))},
            },
            result.update,
        )

    def _evaluate(self, batch: Mapping[str, bytes]) -> dict[str, bytes]:
        replies: dict[str, bytes] = {}
        groups: dict[tuple[str, bytes], list[str]] = {}
        decoded = {cid: msg.decode(m, expect=msg.Kind.EVALUATE) for cid, m in batch.items()}
        for cid, d in decoded.items():
            if cid not in self.clients:
                raise ProtocolError(f"an EVALUATE message for {cid!r}, which is no client of this federation")
            if str(d.header["split"]) not in HELD_OUT_SPLITS:
                raise ProtocolError(
                    f"client {cid!r} scores the global model on its held-out splits {HELD_OUT_SPLITS} only, "
                    f"got split {d.header['split']!r} (its training data's scores would be an exact release about it)"
                )
            groups.setdefault((str(d.header["split"]), d.payload.tobytes()), []).append(cid)
        for (split, _), ids in groups.items():
            vector = torch.from_numpy(decoded[ids[0]].payload)
            scores = self.executor.evaluate([self.clients[c] for c in ids], global_vector=vector, split=split)
            for cid, (metrics, count) in zip(ids, scores):
                noise = decoded[cid].header.get("noise")
                if noise is not None:
                    replies[cid] = self._noised_score(cid, metrics, int(count), noise)
                    continue
                finite = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
                replies[cid] = msg.encode(msg.Kind.SCORES, {"client": cid, "metrics": finite, "count": int(count)})
        return replies

    def _noised_score(self, cid: str, metrics: Mapping[str, float], count: int, noise: Mapping[str, Any]) -> bytes:
        """One Gaussian-noised score, drawn with this client's own randomness; the raw metrics never leave.

        ``per="sum"``: the sum of a per-example metric in [0, 1] over the split (one example, or one
        user with one held-out item, changes it by at most 1); ``per="mean"``: the client's mean
        (a whole client changes it by at most 1). Noise standard deviation: ``multiplier`` x 1.
        """
        metric, per, z = str(noise["metric"]), str(noise["per"]), float(noise["multiplier"])
        if not (math.isfinite(z) and z > 0):
            raise ProtocolError(f"client {cid!r} noises its score with a positive noise multiplier only, got {z!r}")
        if metric not in metrics or not math.isfinite(float(metrics[metric])):
            raise ProtocolError(f"client {cid!r} has no finite {metric!r} on this split to noise")
        value = float(metrics[metric]) * (count if per == "sum" else 1)
        rng = self.randomness.generator(round_index=int(noise["round"]), party=cid, purpose="score-noise")
        return msg.encode(msg.Kind.SCORES, {"client": cid, "noised": value + z * float(rng.standard_normal()), "count": count})

    def inspect(self, t: int, ids: Sequence[str], global_vector: np.ndarray) -> list[ClientResult]:
        """Simulation only: train ``ids`` from ``global_vector`` and return their raw results.

        Local states are put back; nothing is kept (see ``Federation.client_updates``).
        """
        clients = [self.clients[c] for c in ids]
        before = [c.local_state for c in clients]
        try:
            return self.executor.fit(
                clients,
                global_vector=torch.from_numpy(global_vector),
                config=self.train,
                seeds=[self.randomness.seed(round_index=t, party=c, purpose="train") for c in ids],
                round_index=t,
                update_kind=self.update_kind,
                privacy=self.privacy,
            )
        finally:
            for c, state in zip(clients, before):
                c.local_state = state


@dataclass(frozen=True)
class Received:
    """One message the server party received: who sent it, and its bytes."""

    sender: str
    data: bytes


class PartyHost(Protocol):
    """Where client parties live outside the server's process (Ray actors): it builds them and a channel to them."""

    def host(self, clients: Mapping[str, Client], settings: PartySettings, *, record: bool) -> tuple[Channel, dict[str, bytes]]:
        """Build the parties of ``clients``; return the channel to them and their identity public keys."""


class Channel(Protocol):
    """The server party's only link to the other parties: bytes out, bytes back."""

    def exchange(self, batch: Mapping[str, bytes]) -> dict[str, bytes | None]:
        """Deliver a batch by recipient; return the replies (None: that party said nothing)."""

    def send(self, recipient: str, message: bytes) -> bytes | None:
        """Deliver one message; return the reply."""


class RecordingChannel:
    """A channel that copies the bytes each way and can record what the server receives.

    Subclasses deliver a batch (:meth:`_deliver`); this class keeps :attr:`inbox` (with
    ``record``), :attr:`bytes_received` and :attr:`seconds` spent in the exchange.
    """

    def __init__(self, *, record: bool = False) -> None:
        self.record = record
        self.inbox: list[Received] = []
        self.bytes_received = 0
        self.seconds = 0.0

    def _deliver(self, batch: dict[str, bytes]) -> Mapping[str, bytes | None]:
        raise NotImplementedError

    def exchange(self, batch: Mapping[str, bytes]) -> dict[str, bytes | None]:
        """Deliver a batch; only ``bytes`` cross, each way."""
        started = time.perf_counter()
        replies = self._deliver({str(r): bytes(m) for r, m in batch.items()})
        out: dict[str, bytes | None] = {}
        for sender, reply in replies.items():
            if reply is None:
                out[sender] = None
                continue
            data = bytes(reply)
            self.bytes_received += len(data)
            if self.record:
                self.inbox.append(Received(sender, data))
            out[sender] = data
        self.seconds += time.perf_counter() - started
        return out

    def send(self, recipient: str, message: bytes) -> bytes | None:
        """One message, one reply."""
        return self.exchange({recipient: message}).get(recipient)


class InProcessChannel(RecordingChannel):
    """The embedded channel: parties in this process, only copies of bytes crossing.

    Args:
        client_side: the parties at the other end.
        record: keep every byte the server receives in :attr:`inbox` (tests, notebooks).
    """

    def __init__(self, client_side: ClientSide, record: bool = False) -> None:
        super().__init__(record=record)
        self.client_side = client_side

    def _deliver(self, batch: dict[str, bytes]) -> Mapping[str, bytes | None]:
        return self.client_side.handle_batch(batch)
