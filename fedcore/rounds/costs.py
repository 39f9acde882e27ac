"""What a round will cost, said before it is paid: upload bytes, peak memory and time.

Upload bytes come from the protection backend itself: it sums zero vectors of a few small
lengths once (cached per backend setting), and the bytes its client messages take grow with
the vector's length (per coordinate, or per ciphertext for CKKS and BFV) and, under masking,
with the number of neighbours of each client; the estimate extrapolates that to the model's
vector and the round's participants, and adds the federation's own messages (training report,
acknowledgement, evaluation scores). Memory and time are coarser (see :class:`CostEstimate`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import messages as msg

__all__ = ["CostEstimate", "CostWarning", "ProtectionProbe", "probe_protection"]

# Kinds of protection bytes sent by the HE key holder rather than by a client.
_KEY_HOLDER_KINDS = ("public_context", "decryption")
_PROBE_CLIENTS = 16  # masked probes use at most this many clients; more are extrapolated by graph degree
_PROBE_LENGTHS = (1024, 1024 + 65536)  # for backends that send a fixed size per coordinate
_DP_SGD_COPIES = 4  # model-sized tensors DP-SGD adds (measured: ghost clipping, 1M parameters)
_HE_MEMORY_PER_UPLOADED_BYTE = 2.3  # ciphertexts in memory per serialized byte (CKKS compact, measured)
# What torch's first training step adds to a fresh process whatever the model (autograd engine,
# kernels and libraries loaded on first use): 83 MB measured here for a 16 x 8 linear layer.
_FIRST_STEP_BYTES = 80_000_000


class CostWarning(UserWarning):
    """A run whose estimated upload or memory is large enough to say so before it starts."""


@dataclass(frozen=True)
class ProtectionProbe:
    """Bytes and seconds of a backend's messages, measured on zero vectors.

    Attributes:
        unit: coordinates per unit of payload (values per ciphertext; 1 otherwise).
        client_fixed: a client's bytes for the first unit (its keys, shares, headers...).
        client_per_unit: a client's bytes per further unit.
        key_holder_fixed / key_holder_per_coordinate: the HE key holder's messages (public
            context; the released sum, one number per coordinate).
        degree: each client's neighbours in the probe (masking; 0 for other modes).
        seconds_per_unit: time of the longer probe round per unit and client.
    """

    unit: int
    client_fixed: float
    client_per_unit: float
    key_holder_fixed: float
    key_holder_per_coordinate: float
    degree: int
    seconds_per_unit: float


def _unit(backend: Any) -> int:
    preset = getattr(backend, "preset", None)
    for name in ("values_per_ciphertext", "slots"):
        if preset is not None and hasattr(preset, name):
            return int(getattr(preset, name))
    return 1


def protection_degree(backend: Any, clients: int) -> int:
    """Neighbours of each client in a masked round of ``clients`` (0 where no graph is used)."""
    plan = getattr(backend, "plan", None)
    return int(plan(clients).degree) if plan is not None else 0


def _split(bytes_up: dict[str, int]) -> tuple[float, float]:
    holder = sum(v for k, v in bytes_up.items() if k.rsplit("/", 1)[-1] in _KEY_HOLDER_KINDS)
    return float(sum(bytes_up.values()) - holder), float(holder)


_PROBES: dict[str, ProtectionProbe] = {}


def _probe(backend: Any, clients: int) -> ProtectionProbe:
    unit = _unit(backend)
    lengths = (unit, 2 * unit) if unit > 1 else _PROBE_LENGTHS
    measured = []
    for length in lengths:
        updates = {f"probe-{i:03d}": np.zeros(length, dtype=np.float32) for i in range(clients)}
        started = time.perf_counter()
        result = backend.aggregate(updates, round_index=1, rng=np.random.default_rng(0))
        measured.append((time.perf_counter() - started, *_split(dict(result.bytes_up))))
    (t1, c1, h1), (t2, c2, h2) = measured
    units = (lengths[1] - lengths[0]) / unit
    return ProtectionProbe(
        unit=unit,
        client_fixed=c1 / clients - (lengths[0] / unit - 1) * (c2 - c1) / clients / units,
        client_per_unit=(c2 - c1) / clients / units,
        key_holder_fixed=h1 - lengths[0] * (h2 - h1) / (lengths[1] - lengths[0]),
        key_holder_per_coordinate=(h2 - h1) / (lengths[1] - lengths[0]),
        degree=protection_degree(backend, clients),
        seconds_per_unit=t2 / clients / (lengths[1] / unit),
    )


def probe_protection(backend: Any, participants: int) -> ProtectionProbe:
    """Measure ``backend``'s message sizes once for rounds of ``participants`` (cached per setting).

    HE backends are probed with two clients (a client's ciphertexts do not depend on the
    others); masked ones with up to 16 clients, or all of them when the backend's threshold
    needs more.
    """
    if getattr(backend, "integer_noise", None) is not None:  # noise sized for the real vector; sizes are the same
        backend = backend.without_noise()
    he = hasattr(backend, "key_holder_session")
    clients = 2 if he else min(participants, _PROBE_CLIENTS)
    if not he and clients < participants:
        try:
            protection_degree(backend, clients)
        except ValueError:  # an explicit threshold above the probe's size: probe the real round
            clients = participants
    clients = max(clients, 2)
    key = f"{type(backend).__name__}:{backend.describe()!r}:{clients}"
    if key not in _PROBES:
        _PROBES[key] = _probe(backend, clients)
    return _PROBES[key]


@dataclass(frozen=True)
class CostEstimate:
    """The cost of one round, estimated before it runs.

    Attributes:
        mode: the protection mode.
        dimension: shared parameters of the model; ``coordinates``: what a client sends.
        participants: clients expected per round.
        upload_bytes_per_client: what one client sends the server per round (protection
            messages, training report, acknowledgement, evaluation scores).
        key_holder_bytes: what the HE key holder sends the server per round (public context,
            released sum); 0 for other modes.
        upload_bytes_per_round: everything the server receives in a round.
        peak_memory_bytes: memory the first round adds in a fresh process, where the
            simulation holds the server party and every client party (torch's first training
            step, model, optimizer, DP-SGD per-example gradients, each participant's update,
            protected input and the server's inbox). A model of the copies made, not a
            measurement; later rounds reuse the allocators' pools and add less. Measured here
            (4 clients, a fresh process per run, the peak resident set during the round minus
            the resident set before it; estimate in brackets): masked 1.06M / 4.3M parameters
            149 (148) / 377 (355) MB, plaintext 137 (148) / 384 (355) MB, CKKS compact and
            BFV 1.06M 238 (261) and 255 (272) MB (the masked pair is asserted by
            ``tests/unit/fedcore/test_costs.py``).
        seconds_per_round: local training (a timed forward and backward pass on 8 examples,
            scaled to the batch, three times that under DP-SGD, times the planned steps, clients
            in turn) plus protection (the probe's time per unit): an order of magnitude only.
        rounds: rounds planned, if known (totals multiply by it).
    """

    mode: str
    dimension: int
    coordinates: int
    participants: int
    upload_bytes_per_client: int
    key_holder_bytes: int
    upload_bytes_per_round: int
    peak_memory_bytes: int
    seconds_per_round: float
    rounds: int | None = None

    def summary(self) -> str:
        """One line for logs: the figures with their units."""
        total = "" if self.rounds is None else f", {_size(self.upload_bytes_per_round * self.rounds)} over {self.rounds} rounds"
        return (
            f"estimated cost per round ({self.mode}, {self.coordinates:,} coordinates, {self.participants} clients): "
            f"upload {_size(self.upload_bytes_per_client)} per client, {_size(self.upload_bytes_per_round)} in all{total}; "
            f"peak memory {_size(self.peak_memory_bytes)}; "
            + (f"about {self.seconds_per_round:.3g} s" if math.isfinite(self.seconds_per_round) else "time unknown")
        )


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def upload_per_client(probe: ProtectionProbe, *, coordinates: int, degree: int) -> tuple[float, float]:
    """Protection bytes of one client, and of the key holder, for a vector of ``coordinates``.

    Under masking, a client's fixed bytes (shares, unmask answers) grow with its neighbours:
    they are scaled from the probe's degree to the round's.
    """
    units = math.ceil(coordinates / probe.unit)
    fixed = probe.client_fixed * (degree / probe.degree if probe.degree and degree > probe.degree else 1.0)
    client = fixed + probe.client_per_unit * (units - 1)
    holder = probe.key_holder_fixed + probe.key_holder_per_coordinate * coordinates if probe.key_holder_fixed else 0.0
    return client, holder


def message_bytes(*, privacy_event: dict[str, Any] | None, metrics: int) -> tuple[int, int]:
    """The federation's own messages of one client in one round: report and acknowledgement, and scores."""
    names = {f"metric_{i:02d}": 0.123456789 for i in range(metrics)}
    report = msg.encode(
        msg.Kind.TRAIN_REPORT,
        {
            "round": 1_000, "client": "client-000", "ok": True, "error": None, "train_seconds": 0.123456789,
            "steps": 1_000, "metrics": names, "privacy_event": privacy_event,
        },
    )  # fmt: skip
    ack = msg.encode(msg.Kind.ACK, {"round": 1_000, "client": "client-000"})
    scores = msg.encode(msg.Kind.SCORES, {"client": "client-000", "metrics": names, "count": 1_000})
    return len(report) + len(ack), len(scores)


def peak_memory(
    *,
    trained: int,
    coordinates: int,
    participants: int,
    upload_per_client: float,
    key_holder_bytes: float,
    batch_size: int,
    optimizer: str,
    private: bool,
    per_example_gradients: bool,
    homomorphic: bool,
) -> int:
    """Bytes a round adds in a process simulating every party (float32 throughout).

    Training: parameters, gradients and optimizer state (Adam's two moments); under DP-SGD
    four more model-sized tensors (noise, clipped sum, the second backward pass of ghost
    clipping: fitted on measurements here) and one gradient per example of the batch where
    DP-SGD materialises them (Opacus's "default" clipping; ghost and embedding clipping do not). Then for each participant: its update and
    its prepared (clipped, weighted) vector, and its protected messages held by the server
    until the sum completes, with the key holder's released sum under HE; under HE also the
    ciphertexts in memory, which take about 2.3 times their serialized bytes (measured here on
    CKKS ``compact``: SEAL keeps each polynomial unpacked, in 64-bit words).
    """
    states = 2 if optimizer in ("adam", "adamw") else 1
    dp_copies = _DP_SGD_COPIES + (batch_size if per_example_gradients else 0) if private else 0
    training = 4 * trained * (2 + states + dp_copies)
    held = (participants * upload_per_client + key_holder_bytes) * (1 + (_HE_MEMORY_PER_UPLOADED_BYTE if homomorphic else 0.0))
    return int(_FIRST_STEP_BYTES + training + participants * 8 * coordinates + held)
