"""``fedcore launch``: a whole federation on the loopback interface, one process per party.

Provisions kits into a temporary folder, starts ``fedcore server`` on a free port of 127.0.0.1,
then one ``fedcore client`` per silo, streams every process's output prefixed by its party, and
ends with the server's outputs (the same as ``fedcore run``: metrics, checkpoint, model, privacy
report, summary). The temporary kits are deleted at the end.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Sequence

from ..errors import ConfigError, RoundFailedError
from .provision import provision

__all__ = ["launch"]

_START_TIMEOUT = 300.0


def _stream(prefix: str, pipe: IO[str], out: IO[str]) -> None:
    for line in pipe:
        out.write(f"[{prefix}] {line}")
        out.flush()


def _start(args: Sequence[str], prefix: str, threads: list[threading.Thread]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "fedcore", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert proc.stdout is not None
    thread = threading.Thread(target=_stream, args=(prefix, proc.stdout, sys.stdout), daemon=True)
    thread.start()
    threads.append(thread)
    return proc


def launch(
    config_path: str | Path,
    *,
    client_ids: Sequence[str],
    options: Sequence[str] = (),
    server_options: Sequence[str] = (),
    timeout: float = 3600.0,
) -> int:
    """Run the server and one client process per id on 127.0.0.1; return the server's exit status.

    Args:
        config_path: the experiment file, read by every process.
        client_ids: the workload's client ids (one process each).
        options: command-line options every process gets (``--set``, ``--seed``, ``--rounds``, ``--out``...),
            so that all of them build the same federation.
        server_options: options for the server only (``--resume``, deadlines).
        timeout: seconds the whole run may take; then every process is killed.

    Raises:
        RoundFailedError: the server did not start listening within its start-up bound.
    """
    if not client_ids:
        raise ConfigError("launch needs at least one client id")
    threads: list[threading.Thread] = []
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="privfl-kits-") as tmp:
        kits = provision(Path(tmp) / "kits", client_ids=client_ids)
        port_file = Path(tmp) / "port"
        try:
            server = _start(
                ["server", str(config_path), "--kit", str(kits / "server"), "--address", "127.0.0.1:0",
                 "--port-file", str(port_file), *options, *server_options],
                "server", threads,
            )  # fmt: skip
            procs.append(server)
            end = time.monotonic() + _START_TIMEOUT
            while not port_file.exists():
                if server.poll() is not None:
                    return int(server.returncode)
                if time.monotonic() > end:
                    raise RoundFailedError(f"the server did not listen within {_START_TIMEOUT:.0f} s")
                time.sleep(0.1)
            address = f"127.0.0.1:{port_file.read_text(encoding='utf-8').strip()}"
            for cid in client_ids:
                procs.append(
                    _start(
                        ["client", str(config_path), "--kit", str(kits / "clients" / cid), "--server", address, *options],
                        cid,
                        threads,
                    )
                )
            try:
                code = server.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"[launch] the run exceeded {timeout:.0f} s; stopping every process", flush=True)
                code = 124
            for proc in procs[1:]:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            return int(code)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
            for thread in threads:
                thread.join(timeout=5)
