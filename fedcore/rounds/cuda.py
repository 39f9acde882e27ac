"""The CUDA fast path for plaintext aggregation: K client vectors summed on a GPU.

The plaintext baseline every protected mode is measured against should be the fastest one, so
this backend streams the clients' vectors through the GPU: pinned host staging buffers, copies
issued asynchronously on a copy stream, one fused weighted sum per chunk (a single cuBLAS GEMV
reading the ``K x chunk`` block once), double buffering so the next chunk's copy overlaps the
current chunk's sum, and chunks sized to the free GPU memory, so vectors larger than the GPU
are fine. The device is always chosen explicitly; nothing moves to a GPU silently, and asking
for a GPU that is not there raises an error naming what was asked for and what was found.

Who sees what: the same as :class:`secagg.PlaintextSum` (the server sees every update).
Local training on a GPU needs no code here: ``TrainConfig(device="cuda:0")``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

import numpy as np
import torch

from secagg import Stage, SumResult
from secagg.base import check_updates
from secagg.session import ClientKeys, PlaintextClientSession, PlaintextServerSession

from ..errors import ConfigError

__all__ = ["CudaUnavailableError", "CudaSum", "cuda_device", "weighted_sum", "fused_weighted_sum"]

_UNIT_ROUNDOFF = 2.0**-24  # float32
_DEFAULT_STAGING_BYTES = 256 * 2**20  # per pinned staging slot


class CudaUnavailableError(ConfigError):
    """A CUDA device was asked for and is not available (what was found is in the message)."""


def _found() -> str:
    built = torch.version.cuda
    if not built:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return (
            f"torch {torch.__version__} is built with CUDA {built} but torch.cuda.is_available() is False (no driver or no GPU)"
        )
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(names)} CUDA device(s): " + ", ".join(f"cuda:{i} {n}" for i, n in enumerate(names))


def cuda_device(device: str | torch.device) -> torch.device:
    """Resolve an explicitly requested CUDA device (``"cuda"`` means the current one).

    Raises:
        ConfigError: ``device`` does not name a CUDA device.
        CudaUnavailableError: CUDA or that device index is not available; says what was found.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device must name a CUDA device such as 'cuda:0', got {device!r}") from exc
    if dev.type != "cuda":
        raise ConfigError(f"device must name a CUDA device such as 'cuda:0', got {device!r}; the CPU path is secagg.PlaintextSum")
    if not torch.cuda.is_available():
        raise CudaUnavailableError(f"device {str(device)!r} was asked for, but CUDA is not available: {_found()}")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise CudaUnavailableError(f"device {str(device)!r} was asked for, but only {_found()}")
    return torch.device("cuda", index)


def fused_weighted_sum(matrix: torch.Tensor, weights: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_k weights[k] * matrix[k]`` as one GEMV over a ``(K, n)`` row-major block (any device).

    The block is read once; float32 accumulation (error at most about ``(K + 2) * 2^-24 *
    sum_k |w_k x_k|`` per coordinate).
    """
    if matrix.ndim != 2 or weights.ndim != 1 or weights.shape[0] != matrix.shape[0]:
        raise ValueError(f"need a (K, n) matrix and K weights, got {tuple(matrix.shape)} and {tuple(weights.shape)}")
    # matrix.t() is column-major (n, K): cuBLAS runs the non-transposed GEMV, coalesced along n.
    return torch.mv(matrix.t(), weights, out=out) if out is not None else torch.mv(matrix.t(), weights)


class _Buffers:
    """Pinned host staging, device blocks and events for double-buffered streaming (reused)."""

    def __init__(self, *, k: int, chunk: int, length: int, device: torch.device) -> None:
        self.k, self.chunk, self.length, self.device = k, chunk, length, device
        pin = device.type == "cuda"
        self.staging = [torch.empty(k * chunk, dtype=torch.float32, pin_memory=pin) for _ in range(2)]
        self.block = [torch.empty(k * chunk, dtype=torch.float32, device=device) for _ in range(2)]
        self.result = [torch.empty(chunk, dtype=torch.float32, device=device) for _ in range(2)]
        self.host_out = torch.empty(length, dtype=torch.float32, pin_memory=pin)
        if pin:
            self.copy_stream = torch.cuda.Stream(device)
            self.copied = [torch.cuda.Event() for _ in range(2)]
            self.consumed = [torch.cuda.Event() for _ in range(2)]

    def fits(self, *, k: int, chunk: int, length: int, device: torch.device) -> bool:
        return (self.k, self.device) == (k, device) and self.chunk >= chunk and self.length >= length


def _chunk_elements(k: int, length: int, device: torch.device, *, memory_fraction: float, staging_bytes: int) -> int:
    """Elements per chunk: two ``K x chunk`` device blocks within the free memory share, pinned staging capped."""
    chunk = max(1, staging_bytes // (4 * k))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        chunk = min(chunk, max(1, int(free * memory_fraction) // (2 * 4 * (k + 1))))
    return min(chunk, length)


def weighted_sum(
    vectors: Sequence[np.ndarray],
    weights: Sequence[float] | np.ndarray,
    *,
    device: str | torch.device,
    chunk_elements: int | None = None,
    memory_fraction: float = 0.5,
    host_threads: int | None = None,
) -> tuple[np.ndarray, float]:
    """``sum_k w_k v_k`` of host vectors, streamed through ``device``; returns (float64 sum, error bound).

    See :func:`_stream_weighted_sum`. A CUDA device must be present (checked as in
    :func:`cuda_device`); another device (``"cpu"``) runs the same chunked steps without
    pinned memory or streams.

    Raises:
        ValueError: vectors of different lengths or a weight count mismatch.
        ConfigError: ``chunk_elements`` below 1.
        CudaUnavailableError: a CUDA device that is not present.
    """
    dev = torch.device(device)
    total, bound, _ = _stream_weighted_sum(
        vectors, weights, device=cuda_device(dev) if dev.type == "cuda" else dev, chunk_elements=chunk_elements, memory_fraction=memory_fraction,
        host_threads=host_threads,
    )  # fmt: skip
    return total, bound


def _stream_weighted_sum(
    vectors: Sequence[np.ndarray],
    weights: Sequence[float] | np.ndarray,
    *,
    device: str | torch.device,
    chunk_elements: int | None = None,
    memory_fraction: float = 0.5,
    host_threads: int | None = None,
    buffers: _Buffers | None = None,
) -> tuple[np.ndarray, float, _Buffers]:
    """Stream ``sum_k w_k v_k`` through ``device`` chunk by chunk; return (float64 sum, error bound, buffers).

    On CUDA: host rows are copied (by ``host_threads`` threads) into a pinned staging slot, sent
    with a non-blocking copy on a separate stream, summed by :func:`fused_weighted_sum` on the
    compute stream once the copy's event fired, and copied back asynchronously; two slots
    alternate so copies and sums overlap. On another device (used to test the chunking on
    machines without a GPU) the same steps run synchronously.

    Raises:
        ValueError: vectors of different lengths, not float32-convertible, or a weight count mismatch.
    """
    dev = torch.device(device)
    k = len(vectors)
    if k == 0:
        raise ValueError("vectors must hold at least one vector, got none")
    length = int(vectors[0].size)
    for i, v in enumerate(vectors):
        if v.ndim != 1 or v.size != length:
            raise ValueError(f"vector {i} has shape {v.shape}, expected ({length},) like the first")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (k,):
        raise ValueError(f"weights must hold one weight per vector ({k}), got shape {w.shape}")
    reusable = buffers is not None and (buffers.k, buffers.device) == (k, dev) and buffers.length >= length
    if chunk_elements is None and reusable:
        chunk = min(buffers.chunk, length)  # type: ignore[union-attr]
    elif chunk_elements is None:
        chunk = _chunk_elements(k, length, dev, memory_fraction=memory_fraction, staging_bytes=_DEFAULT_STAGING_BYTES)
    else:
        if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1:
            raise ConfigError(f"chunk_elements must be an int >= 1 or None, got {chunk_elements!r}")
        chunk = min(chunk_elements, length)
    bufs = buffers if buffers is not None and buffers.fits(k=k, chunk=chunk, length=length, device=dev) else None
    if bufs is None:
        bufs = _Buffers(k=k, chunk=chunk, length=length, device=dev)
    w_dev = torch.as_tensor(w.astype(np.float32), device=dev)
    cuda = dev.type == "cuda"
    rowmax = torch.zeros(k, dtype=torch.float32, device=dev)
    threads = host_threads or min(8, os.cpu_count() or 1)
    starts = list(range(0, length, chunk))

    def fill(slot: int, start: int, n: int) -> None:
        stage = bufs.staging[slot].numpy()[: k * n].reshape(k, n)

        def row(i: int) -> None:
            np.copyto(stage[i], vectors[i][start : start + n], casting="same_kind")

        if threads > 1 and k > 1:
            list(pool.map(row, range(k)))
        else:
            for i in range(k):
                row(i)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        compute = torch.cuda.current_stream(dev) if cuda else None
        for step, start in enumerate(starts):
            slot = step % 2
            n = min(chunk, length - start)
            if cuda and step >= 2:
                bufs.copied[slot].synchronize()  # the staging slot's previous copy has left the host
            fill(slot, start, n)
            host = bufs.staging[slot][: k * n]
            block = bufs.block[slot][: k * n]
            if cuda:
                assert bufs.copy_stream is not None and compute is not None  # both exist whenever the device is CUDA
                with torch.cuda.stream(bufs.copy_stream):
                    bufs.copy_stream.wait_event(bufs.consumed[slot])  # the block's previous sum is done
                    block.copy_(host, non_blocking=True)
                    bufs.copied[slot].record(bufs.copy_stream)
                compute.wait_event(bufs.copied[slot])
            else:
                block.copy_(host)
            matrix = block.view(k, n)
            result = bufs.result[slot][:n]
            fused_weighted_sum(matrix, w_dev, out=result)
            torch.maximum(rowmax, torch.linalg.vector_norm(matrix, ord=float("inf"), dim=1), out=rowmax)
            bufs.host_out[start : start + n].copy_(result, non_blocking=cuda)
            if cuda:
                bufs.consumed[slot].record(compute)
        if cuda:
            assert compute is not None  # the device's current stream, taken above
            compute.synchronize()
    total = bufs.host_out[:length].numpy().astype(np.float64)
    ops = k + 2  # K additions, the product, the weight's rounding to float32
    gamma = ops * _UNIT_ROUNDOFF / (1.0 - ops * _UNIT_ROUNDOFF)
    bound = float(gamma * np.sum(np.abs(w) * rowmax.cpu().numpy().astype(np.float64)))
    return total, bound, bufs


class CudaSum:
    """Plaintext secure-sum backend on a GPU (implements :class:`secagg.SecureSum`).

    Equals :class:`secagg.PlaintextSum` within ``SumResult.max_abs_error`` (float32 accumulation
    on the GPU instead of float64 on the CPU). Inputs are checked for NaN and Inf on the GPU
    (through the sum); only when the sum is not finite are the vectors scanned on the host to
    name the client.

    Args:
        device: the GPU, named explicitly (``"cuda:0"``).
        chunk_elements: coordinates per chunk (None: sized to ``memory_fraction`` of the free GPU
            memory, and 256 MiB of pinned staging per buffer).
        memory_fraction: share of the free GPU memory the two device blocks may take.

    Raises:
        ConfigError: ``device`` is not a CUDA device or a setting is out of range.
        CudaUnavailableError: CUDA or the device is absent (the message says what was found).
    """

    mode = "plaintext"
    trust_model = "Plaintext aggregation (on a GPU): the server sees every participating client's individual update in the clear."

    def __init__(self, *, device: str, chunk_elements: int | None = None, memory_fraction: float = 0.5) -> None:
        if chunk_elements is not None and (
            isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1
        ):
            raise ConfigError(f"chunk_elements must be an int >= 1 or None, got {chunk_elements!r}")
        if not (isinstance(memory_fraction, (int, float)) and 0.0 < memory_fraction <= 0.9):
            raise ConfigError(f"memory_fraction must be in (0, 0.9], got {memory_fraction!r}")
        self.device = cuda_device(device)
        self.chunk_elements = chunk_elements
        self.memory_fraction = float(memory_fraction)
        self._buffers: _Buffers | None = None

    def aggregate(
        self,
        updates: Mapping[str, np.ndarray],
        *,
        round_index: int,
        rng: np.random.Generator,
        dropouts: Mapping[str, Stage] | None = None,
    ) -> SumResult:
        """Sum the updates of the clients that did not drop before UNMASK, on the GPU.

        Raises:
            ValueError / TypeError: invalid updates (as :func:`secagg.base.check_updates` says).
        """
        if not updates:
            raise ValueError("updates must hold at least one client's vector, got none")
        ids = sorted(updates)
        for cid in ids:
            if not isinstance(cid, str):
                raise TypeError(f"client ids must be str, got {cid!r} ({type(cid).__name__})")
            if not isinstance(updates[cid], np.ndarray):
                raise TypeError(f"update of client {cid!r} must be a numpy array, got {type(updates[cid]).__name__}")
        dropouts = dict(dropouts or {})
        contributors = [c for c in ids if dropouts.get(c, Stage.UNMASK) > Stage.MASKED_INPUT]
        dropped = sorted(c for c in ids if c in dropouts)
        length = updates[ids[0]].size
        try:
            total, bound, self._buffers = _stream_weighted_sum(
                [updates[c] for c in (contributors or ids)],
                np.ones(len(contributors or ids)),
                device=self.device,
                chunk_elements=self.chunk_elements,
                memory_fraction=self.memory_fraction,
                buffers=self._buffers,
            )
        except ValueError:
            check_updates(updates)  # names the client at fault
            raise
        if not contributors:
            total = np.zeros(length, dtype=np.float64)
        if not np.all(np.isfinite(total)):
            check_updates(updates)  # raises, naming the client with NaN or Inf
            raise ValueError("the sum overflowed float32 (an update is too large for the GPU path)")
        return SumResult(
            total=total,
            contributors=tuple(contributors),
            dropped=tuple(dropped),
            bytes_up={"update": 4 * length * len(contributors)},
            bytes_down={},
            max_abs_error=bound,
            mode=self.mode,
        )

    def client_session(
        self,
        client_id: str,
        *,
        round_index: int,
        participants: Sequence[str],
        rng: np.random.Generator,
        keys: ClientKeys | None = None,
    ) -> PlaintextClientSession:
        """A client's half: the vector in the clear, as in plaintext mode."""
        return PlaintextClientSession(client_id, round_index=round_index)

    def server_session(
        self, *, round_index: int, participants: Sequence[str], length: int, public_context: bytes | None = None
    ) -> PlaintextServerSession:
        """The server's half: the received vectors summed on the GPU when the round closes."""

        def on_gpu(vectors: Mapping[str, np.ndarray]) -> tuple[np.ndarray, float]:
            result = self.aggregate(dict(vectors), round_index=round_index, rng=np.random.default_rng(0))
            return result.total, result.max_abs_error

        return PlaintextServerSession(round_index=round_index, participants=participants, length=length, sum_vectors=on_gpu)

    def describe(self) -> dict[str, object]:
        """The backend's parameters for the report: mode, device and chunking."""
        props = torch.cuda.get_device_properties(self.device)
        return {
            "mode": self.mode,
            "device": str(self.device),
            "device_name": props.name,
            "device_memory_bytes": int(props.total_memory),
            "cuda": torch.version.cuda,
            "chunk_elements": self.chunk_elements,
            "memory_fraction": self.memory_fraction,
            "accumulation": "float32 (one GEMV per chunk)",
        }
