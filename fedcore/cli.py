"""Command line: ``fedcore run CONFIG`` runs an experiment from a TOML or YAML file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from typing import Any, Sequence

from .config import _SECTIONS, ExperimentConfig, load_config
from .errors import FedcoreError

__all__ = ["main"]


# A Sphinx cross-reference (``:class:`~fedcore.TrainConfig` ``): group 1 is "~" when only the last name shows.
_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")


def _plain_text(doc: str) -> str:
    """A docstring line as a terminal shows it: Sphinx roles as their names, no double backquotes."""
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), doc)
    return text.replace("``", "")


def _config_reference() -> str:
    lines = ["configuration keys (TOML tables / YAML mappings; defaults in brackets):"]
    top = [f for f in dataclasses.fields(ExperimentConfig) if f.name not in _SECTIONS]
    lines.append("  top level: " + ", ".join(f"{f.name} [{f.default!r}]" for f in top))
    for name, cls in _SECTIONS.items():
        doc = _plain_text((cls.__doc__ or "").strip().splitlines()[0]).removeprefix(f"[{name}]: ")
        lines.append(f"  [{name}] {doc}")
        lines.append("      " + ", ".join(f"{f.name} [{f.default!r}]" for f in dataclasses.fields(cls)))
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FedcoreError(f"--set takes section.key=value, got {pair!r}")
        out[key] = _parse_value(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedcore",
        description="Private federated learning: run experiments with DP, secure aggregation and HE.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run an experiment from a TOML or YAML config",
        description="Run a federated experiment. Writes metrics.jsonl, TensorBoard scalars, checkpoints, "
        "the final model and, when DP is on, the privacy budget report (JSON + HTML) to the output folder.",
        epilog=_config_reference(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("config", help="path to the experiment file (.toml, .yaml or .yml); see examples/main.toml")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set privacy.target_epsilon=4 --set rounds=10 (repeatable; values parsed as JSON when possible)",
    )
    run.add_argument("--out", dest="output_dir", help="output folder (overrides output_dir)")
    run.add_argument("--rounds", type=int, help="number of rounds (overrides rounds)")
    run.add_argument("--seed", type=int, help="random seed (overrides seed)")
    run.add_argument("--resume", action="store_true", help="continue from the checkpoint in the output folder")
    run.add_argument("--quiet", action="store_true", help="no progress bars or per-round lines")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedcore`` command; returns the exit status (0 on success, 2 on a refused config)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        overrides = _overrides(args.overrides)
        for key in ("output_dir", "rounds", "seed"):
            if getattr(args, key) is not None:
                overrides[key] = getattr(args, key)
        if args.quiet:
            overrides["logging.quiet"] = True
        config = load_config(args.config, overrides=overrides)
        from .experiment import run_experiment

        outcome = run_experiment(config, resume=args.resume)
    except FedcoreError as exc:
        print(f"fedcore: error: {exc}", file=sys.stderr)
        return 2
    print(outcome.summary())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
