"""The speed a person feels: the main job idle and beside a CPU-bound process, and each notebook.

Three measurements, each in fresh processes so that a torch thread setting takes effect from
the start:

1. the main job (``fedcore run examples/main.toml``, 10 rounds) with the library's own thread
   policy, once on an otherwise idle machine and once beside one co-running CPU-bound process
   (``python -c "while True: pass"``): wall time of the whole command, and the median of the
   per-round times it logs (``round_seconds`` in ``metrics.jsonl``, which includes the
   round's federated evaluation);
2. with ``--threads``: the same per-round medians at explicit ``torch.set_num_threads`` and
   ``torch.set_num_interop_threads`` settings (1 and 2 each), idle and loaded, over
   ``--sweep-rounds`` rounds: the evidence for the policy in :mod:`fedcore.threads`;
3. each notebook in ``notebooks/`` executed with nbclient as ``tests/test_notebooks.py`` does
   (``python3`` kernel, the notebook's folder, its outputs in a temporary folder), without any
   thread variable in the environment: its wall time.

The environment of every run has ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` removed, so that
what is measured is the library's policy (or the explicit setting of the sweep), never the
caller's shell. Absolute seconds depend on the machine; the loaded/idle ratio measured side by
side is what carries over.

Usage: ``python benchmarks/mainjob.py`` (policy runs and notebooks), ``--threads`` to add the
sweep, ``--skip-notebooks`` to leave them out. The last line is the summary the issue asks for:
``mainjob idle_s=X loaded_round_ratio=Y slowest_notebook_s=Z``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "main.toml"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Runs the CLI after setting torch's thread counts explicitly (fedcore respects an explicit setting).
DRIVER = (
    "import sys, torch, fedcore.experiments.cli\n"
    "torch.set_num_threads(int(sys.argv[1])); torch.set_num_interop_threads(int(sys.argv[2]))\n"
    "raise SystemExit(fedcore.experiments.cli.main(sys.argv[3:]))\n"
)


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@contextlib.contextmanager
def _spinner(active: bool) -> Iterator[None]:
    """One CPU-bound process beside the measured one (or nothing), stopped by its own pid."""
    if not active:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it reach its loop
        yield
    finally:
        proc.kill()
        proc.wait()


def run_job(*, rounds: int, loaded: bool, threads: tuple[int, int] | None = None) -> dict[str, float]:
    """Run the main job in a fresh process: wall and CPU seconds, the median logged round seconds."""
    with tempfile.TemporaryDirectory(prefix="privfl-mainjob-") as tmp:
        cli = ["run", str(CONFIG), "--out", str(Path(tmp) / "out"), "--rounds", str(rounds), "--quiet"]
        if threads is None:
            command = [sys.executable, "-m", "fedcore.experiments.cli", *cli]
        else:
            command = [sys.executable, "-c", DRIVER, str(threads[0]), str(threads[1]), *cli]
        with _spinner(loaded):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            subprocess.run(command, cwd=ROOT, env=_environment(), check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the job only: the spinner is not reaped yet
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        rows = [json.loads(line) for line in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()]
    rounds_s = [row["round_seconds"] for row in rows]
    return {"wall_s": wall, "cpu_s": cpu, "round_s": statistics.median(rounds_s), "rounds": len(rounds_s)}


def run_notebook(path: Path, keep: Path | None = None) -> float:
    """Execute one notebook as the test does; its wall seconds (the executed copy goes to ``keep``)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    saved = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="privfl-nb-") as tmp:
        os.environ.clear()
        os.environ.update(_environment())
        os.environ["PRIVFL_NOTEBOOK_OUT"] = str(Path(tmp) / "outputs")
        os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
        try:
            client = NotebookClient(
                nb, kernel_name="python3", timeout=600, startup_timeout=120, resources={"metadata": {"path": str(path.parent)}}
            )
            started = time.perf_counter()
            try:
                client.execute()
            finally:
                if keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    nbformat.write(nb, keep / path.name)
            return time.perf_counter() - started
        finally:
            os.environ.clear()
            os.environ.update(saved)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", action="store_true", help="add the sweep over explicit torch thread settings")
    ap.add_argument("--sweep-rounds", type=int, default=3, help="rounds per sweep run (default 3)")
    ap.add_argument("--skip-notebooks", action="store_true", help="leave out the notebooks")
    ap.add_argument("--skip-job", action="store_true", help="leave out the main job (notebooks only)")
    ap.add_argument("--keep", type=Path, help="write the executed notebooks to this folder")
    args = ap.parse_args(argv)

    print(f"# main job: {CONFIG.relative_to(ROOT)}, {os.cpu_count()} CPUs; loaded = beside one `while True: pass`")
    if args.threads:
        print()
        print("| intra-op threads | inter-op threads | idle round s | loaded round s | loaded / idle |")
        print("|---|---|---|---|---|")
        for threads in ((1, 1), (1, 2), (2, 1), (2, 2)):
            idle = run_job(rounds=args.sweep_rounds, loaded=False, threads=threads)
            loaded = run_job(rounds=args.sweep_rounds, loaded=True, threads=threads)
            print(
                f"| {threads[0]} | {threads[1]} | {idle['round_s']:.2f} | {loaded['round_s']:.2f} | "
                f"{loaded['round_s'] / idle['round_s']:.2f} |",
                flush=True,
            )
    idle_s = ratio = float("nan")
    if not args.skip_job:
        idle = run_job(rounds=10, loaded=False)
        loaded = run_job(rounds=10, loaded=True)
        idle_s, ratio = idle["wall_s"], loaded["round_s"] / idle["round_s"]
        print()
        print("| main job, library policy | wall s | CPU s | median round s |")
        print("|---|---|---|---|")
        for label, row in (("idle", idle), ("beside one CPU-bound process", loaded)):
            print(f"| {label} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | {row['round_s']:.2f} |", flush=True)

    slowest = float("nan")
    if not args.skip_notebooks:
        print()
        print("| notebook | wall s |")
        print("|---|---|")
        times = []
        for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
            seconds = run_notebook(path, args.keep)
            times.append(seconds)
            print(f"| {path.name} | {seconds:.1f} |", flush=True)
        slowest = max(times)
    print(f"mainjob idle_s={idle_s:.1f} loaded_round_ratio={ratio:.2f} slowest_notebook_s={slowest:.1f}")


if __name__ == "__main__":
    main()
