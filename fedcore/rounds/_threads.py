"""The library's torch thread policy: one intra-op thread, unless the user chose a number.

Why one: the models of a simulated federation are small, and a machine is often shared. Torch's
default is one OpenMP thread per core; each operation then waits at a barrier for all of them,
so when another process holds a core every operation waits for a descheduled thread. Measured on
the main job on a shared 2-core machine (``benchmarks/mainjob.py --threads``, median seconds per
round, other sessions' work running throughout): 1 intra-op thread 30 s without and 72 s beside
one CPU-bound process; 2 threads 78 s and 135 s (2.6x and 1.9x slower than one). The inter-op
pool is not used by these jobs (no ``torch.jit.fork``); runs with 2 inter-op threads (1 intra-op:
9 s and 37 s; 2 intra-op: 63 s and 135 s) differ from those with 1 by the swing of the background
load, so it is left alone (torch fixes it once work starts anyway). Results do not depend on the
thread count.
"""

from __future__ import annotations

import os

import torch

__all__ = ["use_library_threads"]

# Variables through which a user sets the thread count of torch's OpenMP / MKL pools.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# torch's intra-op thread count when fedcore was imported: a different count later is the user's.
_AT_IMPORT = torch.get_num_threads()
_applied = False


def use_library_threads() -> bool:
    """Set torch to one intra-op thread, once per process, unless the user chose a count.

    The user's choice is respected: ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` in the
    environment, or a ``torch.set_num_threads`` call made after importing fedcore (one made
    before cannot be told from torch's default). The policy runs at most once per process, so
    a count set after the first federation is never overridden either. Called by the library's
    entry points: ``Federation``, ``build_workload`` (hence ``fedcore run``) and the text
    encoder.

    Returns:
        True if this call set the thread count.
    """
    global _applied
    if _applied:
        return False
    _applied = True
    if any(os.environ.get(name) for name in THREAD_VARIABLES) or torch.get_num_threads() != _AT_IMPORT:
        return False
    torch.set_num_threads(1)
    return True
