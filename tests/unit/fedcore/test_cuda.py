"""The CUDA fast path: against the CPU path when CUDA is present, a clear error when it is not.

The chunked, double-buffered streaming is also checked on the CPU device (same code path minus
pinned memory and streams), so its chunk arithmetic is tested on every machine.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore import ConfigError, FedAvg, Federation, TrainConfig, UpdatePipeline
from fedcore.rounds.cuda import CudaSum, CudaUnavailableError, _stream_weighted_sum, cuda_device, fused_weighted_sum, weighted_sum
from secagg import PlaintextSum, Stage

from .toy import ToyTask, toy_clients

HAS_CUDA = torch.cuda.is_available()


def _updates(rng, k, d, scale=1.0):
    return {f"c{i:02d}": (scale * rng.normal(size=d)).astype(np.float32) for i in range(k)}


@settings(max_examples=30, deadline=None)
@given(
    k=st.integers(1, 9),
    d=st.integers(1, 600),
    chunk=st.integers(1, 700),
    seed=st.integers(0, 2**32 - 1),
)
def test_chunked_streaming_equals_the_float64_sum_on_cpu(k, d, chunk, seed):
    rng = np.random.default_rng(seed)
    vectors = [rng.normal(size=d).astype(np.float32) for _ in range(k)]
    weights = rng.uniform(0.0, 2.0, size=k)
    total, bound = weighted_sum(vectors, weights, device="cpu", chunk_elements=chunk)
    exact = sum(w * v.astype(np.float64) for w, v in zip(weights, vectors))
    assert total.dtype == np.float64 and total.shape == (d,)
    assert np.max(np.abs(total - exact)) <= bound
    first, _, buffers = _stream_weighted_sum(vectors, weights, device="cpu", chunk_elements=chunk)
    again, _, reused = _stream_weighted_sum(vectors, weights, device="cpu", chunk_elements=chunk, buffers=buffers)
    assert reused is buffers and np.array_equal(first, again) and np.array_equal(total, again)


def test_fused_weighted_sum_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"need a \(K, n\) matrix and K weights, got \(3, 4\) and \(2,\)"):
        fused_weighted_sum(torch.zeros(3, 4), torch.zeros(2))
    with pytest.raises(ValueError, match=r"vector 1 has shape \(5,\), expected \(4,\)"):
        weighted_sum([np.zeros(4, np.float32), np.zeros(5, np.float32)], [1.0, 1.0], device="cpu")
    with pytest.raises(ValueError, match=r"weights must hold one weight per vector \(2\), got shape \(3,\)"):
        weighted_sum([np.zeros(4, np.float32)] * 2, [1.0, 1.0, 1.0], device="cpu")
    with pytest.raises(ConfigError, match="chunk_elements must be an int >= 1 or None, got 0"):
        weighted_sum([np.zeros(4, np.float32)], [1.0], device="cpu", chunk_elements=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"device": "cpu"}, "device must name a CUDA device such as 'cuda:0', got 'cpu'; the CPU path is secagg.PlaintextSum"),
        ({"device": "tpu-ish"}, "device must name a CUDA device such as 'cuda:0', got 'tpu-ish'"),
        ({"device": "cuda:0", "chunk_elements": 0}, "chunk_elements must be an int >= 1 or None, got 0"),
        ({"device": "cuda:0", "memory_fraction": 1.5}, r"memory_fraction must be in \(0, 0.9\], got 1.5"),
    ],
)
def test_bad_settings_name_the_parameter(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CudaSum(**kwargs)


def test_cuda_sum_equals_the_cpu_path_or_reports_its_absence():
    """With CUDA: CudaSum equals PlaintextSum (chunked, dropouts, reuse). Without: the error says why."""
    if not HAS_CUDA:
        found = "CPU-only build" if torch.version.cuda is None else "torch.cuda.is_available() is False"
        with pytest.raises(CudaUnavailableError, match=rf"device 'cuda:0' was asked for, but CUDA is not available: .*{found}"):
            CudaSum(device="cuda:0")
        with pytest.raises(CudaUnavailableError, match="device 'cuda' was asked for"):
            cuda_device("cuda")
        with pytest.raises(CudaUnavailableError, match="device 'cuda:1' was asked for"):
            weighted_sum([np.zeros(3, np.float32)], [1.0], device="cuda:1")
        return
    rng = np.random.default_rng(3)
    plain = PlaintextSum()
    for k, d, chunk in [(1, 7, None), (5, 1000, 64), (12, 4097, 1000), (3, 100_000, None)]:
        backend = CudaSum(device="cuda:0", chunk_elements=chunk)
        updates = _updates(rng, k, d)
        dropouts = {"c00": Stage.MASKED_INPUT} if k > 2 else {}
        for _ in range(2):  # the second call reuses the pinned and device buffers
            got = backend.aggregate(updates, round_index=1, rng=rng, dropouts=dropouts)
            want = plain.aggregate(updates, round_index=1, rng=rng, dropouts=dropouts)
            assert got.contributors == want.contributors and got.dropped == want.dropped
            assert np.max(np.abs(got.total - want.total)) <= got.max_abs_error
            assert 0 < got.max_abs_error < 1e-4
    info = CudaSum(device="cuda:0").describe()
    assert info["device"] == "cuda:0" and info["mode"] == "plaintext" and info["device_name"]
    with pytest.raises(CudaUnavailableError, match=f"device 'cuda:{torch.cuda.device_count()}' was asked for, but only"):
        CudaSum(device=f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(ValueError, match="update of client 'c01' holds NaN or Inf"):
        CudaSum(device="cuda:0").aggregate(
            {"c00": np.zeros(3, np.float32), "c01": np.array([0, np.nan, 0], np.float32)}, round_index=1, rng=rng
        )


def test_federation_on_the_cuda_backend_matches_plaintext_or_reports_absence():
    """A federation whose pipeline uses the GPU sum reaches the plaintext model (within float32)."""
    if not HAS_CUDA:
        with pytest.raises(CudaUnavailableError, match="was asked for, but CUDA is not available"):
            UpdatePipeline(backend=CudaSum(device="cuda:0"), max_examples=60)
        return
    train = TrainConfig(lr=0.05, epochs=1, batch_size=16)
    feds = [
        Federation(task=ToyTask(), clients=toy_clients(4), strategy=FedAvg(), train=train, seed=5, quiet=True,
                   evaluate_every=0, pipeline=UpdatePipeline(backend=backend, max_examples=55))
        for backend in (PlaintextSum(), CudaSum(device="cuda:0"))
    ]  # fmt: skip
    for fed in feds:
        fed.run(3)
    np.testing.assert_allclose(feds[0].global_vector, feds[1].global_vector, atol=1e-5)
