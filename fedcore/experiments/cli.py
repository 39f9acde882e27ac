"""Command line: ``fedcore run CONFIG`` runs an experiment from a TOML or YAML file;
``fedcore tune CONFIG --search SPACE.toml`` searches its hyperparameters privately.

Deployment (:mod:`fedcore.deploy`): ``fedcore provision`` makes the kits, ``fedcore server`` and
``fedcore client`` run one party per process over gRPC with mutual TLS, and ``fedcore launch`` runs
a whole federation that way on the loopback interface.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from typing import Any, Sequence

from ..errors import FedcoreError
from .config import _SECTIONS, ExperimentConfig, load_config

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


def _experiment_options(parser: argparse.ArgumentParser, *, full: bool = True) -> None:
    """The options that change the experiment's config (every party of a deployment gets the same)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set privacy.target_epsilon=4 --set rounds=10 (repeatable; values parsed as JSON when possible)",
    )
    parser.add_argument("--seed", type=int, help="random seed (overrides seed)")
    if full:
        parser.add_argument("--out", dest="output_dir", help="output folder (overrides output_dir)")
        parser.add_argument("--rounds", type=int, help="number of rounds (overrides rounds)")
        parser.add_argument("--quiet", action="store_true", help="no progress bars or per-round lines")


def _load(args: argparse.Namespace, config_path: str, *, extra: dict[str, Any] | None = None) -> Any:
    overrides = _overrides(args.overrides)
    for key in ("output_dir", "rounds", "seed"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if getattr(args, "quiet", False):
        overrides["logging.quiet"] = True
    overrides.update(extra or {})
    return load_config(config_path, overrides=overrides)


def _passthrough(args: argparse.Namespace, extra: Sequence[str]) -> list[str]:
    """The experiment options of ``args`` as command-line words, for the processes a launch starts."""
    words = [w for pair in args.overrides for w in ("--set", pair)] + list(extra)
    for flag, key in (("--out", "output_dir"), ("--rounds", "rounds"), ("--seed", "seed")):
        if getattr(args, key) is not None:
            words += [flag, str(getattr(args, key))]
    return words + (["--quiet"] if args.quiet else [])


def _client_ids(args: argparse.Namespace, config_path: str | None, count: int | None) -> list[str]:
    """The clients to provision: the workload's (with ``count`` silos), listed ones, or client-0..N-1."""
    if getattr(args, "client_ids", None):
        return [c.strip() for c in args.client_ids.split(",") if c.strip()]
    if config_path is not None:
        from .experiment import build_workload

        extra = {"workload.num_silos": count} if count is not None else {}
        ids = sorted(build_workload(_load(args, config_path, extra=extra)).clients)
        if count is not None and len(ids) != count:
            raise FedcoreError(
                f"--clients {count}: the workload has {len(ids)} clients with workload.num_silos={count}: {ids[:10]}"
            )
        return ids
    if count is None or count < 1:
        raise FedcoreError(
            f"provision needs --clients N >= 1, --client-ids, or a CONFIG to take the ids from, got --clients {count}"
        )
    return [f"client-{i}" for i in range(count)]


def _deploy(args: argparse.Namespace) -> int:
    from .. import deploy
    from ..deploy.processes import run_client, serve
    from ..deploy.transport import Limits

    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
    logging.getLogger("fedcore.deploy").setLevel(logging.INFO)
    if args.command == "provision":
        if args.revoke:
            print(f"revoked {args.revoke}: {deploy.revoke(args.out, args.revoke)}")
            return 0
        ids = _client_ids(args, args.config, args.clients)
        out = deploy.provision(args.out, client_ids=ids, server_names=args.server_name or ("localhost", "127.0.0.1"))
        print(f"provisioned {len(ids)} clients in {out}: authority/ (keep it), server/, clients/<id>/")
        return 0
    if args.command == "server":
        limits = Limits(reply_deadline=args.reply_deadline, enrol_timeout=args.enrol_timeout)
        outcome = serve(_load(args, args.config), kit=args.kit, address=args.address, resume=args.resume, limits=limits,
                        port_file=args.port_file)  # fmt: skip
        print(outcome.summary())
        return 0
    if args.command == "client":
        run_client(_load(args, args.config), kit=args.kit, server=args.server, server_name=args.server_name,
                   limits=Limits(reconnect_seconds=args.reconnect_seconds))  # fmt: skip
        return 0
    from ..deploy.launch import launch
    from ..deploy.processes import check_deployable

    silos = ["--set", f"workload.num_silos={args.clients}"]
    check_deployable(_load(args, args.config, extra={"workload.num_silos": args.clients}))
    ids = _client_ids(args, args.config, args.clients)
    return launch(args.config, client_ids=ids, options=_passthrough(args, silos), timeout=args.timeout,
                  server_options=["--reply-deadline", str(args.reply_deadline)])  # fmt: skip


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
    _experiment_options(run)
    run.add_argument("--resume", action="store_true", help="continue from the checkpoint in the output folder")

    prov = sub.add_parser(
        "provision",
        help="make the federation CA, the server's and each client's kit (mutual TLS), or revoke a client",
        description="Write DIR/authority (the CA: keep it), DIR/server (the server's kit) and DIR/clients/ID (one kit per "
        "client: its TLS key and certificate, its identity key, the CA certificate, the public directory).",
    )
    prov.add_argument("config", nargs="?", help="take the client ids from this experiment's workload (with --clients N silos)")
    prov.add_argument("--out", required=True, help="provisioning folder")
    prov.add_argument("--clients", type=int, help="number of clients (ids from CONFIG's workload, else client-0..N-1)")
    prov.add_argument("--client-ids", help="comma-separated client ids")
    prov.add_argument(
        "--server-name",
        action="append",
        default=[],
        help="host name or IP of the server (repeatable; default localhost, 127.0.0.1)",
    )
    prov.add_argument("--revoke", metavar="ID", help="add client ID's certificate to the server's revocation list")
    _experiment_options(prov, full=False)

    server = sub.add_parser("server", help="run the server party: listen for the clients (mutual TLS) and run the experiment")
    server.add_argument("config", help="the experiment file (every party uses the same)")
    server.add_argument("--kit", required=True, help="the server's kit folder (DIR/server of `fedcore provision`)")
    server.add_argument(
        "--address", default="127.0.0.1:50051", help="host:port to listen on (port 0: a free port) [127.0.0.1:50051]"
    )
    server.add_argument("--port-file", help="write the port listened on to this file")
    server.add_argument(
        "--reply-deadline", type=float, default=300.0, help="seconds a client may take to answer one message [300]"
    )
    server.add_argument(
        "--enrol-timeout", type=float, default=300.0, help="seconds to wait for every client before round 1 [300]"
    )
    server.add_argument("--resume", action="store_true", help="continue from the checkpoint in the output folder")
    _experiment_options(server)

    client = sub.add_parser("client", help="run one client party: attend the server and answer it until the run ends")
    client.add_argument("config", help="the experiment file (every party uses the same)")
    client.add_argument("--kit", required=True, help="this client's kit folder (DIR/clients/ID of `fedcore provision`)")
    client.add_argument("--server", required=True, help="the server's host:port")
    client.add_argument("--server-name", help="the name the server's certificate was issued for, if not the host in --server")
    client.add_argument(
        "--reconnect-seconds", type=float, default=120.0, help="how long to keep trying an unreachable server [120]"
    )
    _experiment_options(client)

    launch = sub.add_parser(
        "launch",
        help="run a whole federation as separate processes on 127.0.0.1 (provision, server, N clients)",
        description="Provision kits into a temporary folder, start the server and one client process per silo on the "
        "loopback interface, stream their logs, and end with the same outputs as `fedcore run`.",
    )
    launch.add_argument("config", help="the experiment file")
    launch.add_argument("--clients", type=int, required=True, help="number of client processes (sets workload.num_silos)")
    launch.add_argument("--timeout", type=float, default=3600.0, help="seconds the whole run may take [3600]")
    launch.add_argument(
        "--reply-deadline", type=float, default=300.0, help="seconds a client may take to answer one message [300]"
    )
    _experiment_options(launch)

    tune = sub.add_parser(
        "tune",
        help="private hyperparameter search over a config (FLAML), its cost charged to the budget",
        description="Private hyperparameter search (Papernot & Steinke, ICLR 2022): a hidden, random number of "
        "independent trials, each a whole federated run with a noised validation score; only the best is released. "
        "privacy.target_epsilon is the whole search's epsilon; privacy.budget_epsilon (or the target) refuses a search "
        "it cannot afford before the first trial. Writes the privacy report (with its tuning section) and "
        "tune_summary.json (the winner's config) to the output folder.",
        epilog="search space file (TOML): [trials] distribution = geometric | truncated_negative_binomial (eta) | "
        'poisson, mean; [score] metric, noise_multiplier; [space] "train.lr" = {loguniform = [lo, hi]} '
        "(uniform, randint, lograndint, choice).",
    )
    tune.add_argument("config", help="path to the experiment file (.toml, .yaml or .yml)")
    tune.add_argument("--search", dest="space", required=True, metavar="SPACE.toml", help="the search space file")
    _experiment_options(tune, full=False)
    tune.add_argument("--out", dest="output_dir", help="output folder (overrides output_dir)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedcore`` command; returns the exit status (0 on success, 2 on a refused config)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "tune":
            overrides = _overrides(args.overrides)
            for key in ("output_dir", "seed"):
                if getattr(args, key) is not None:
                    overrides[key] = getattr(args, key)
            import dp

            from .tuning import run_tune

            try:
                tuned = run_tune(args.config, args.space, overrides=overrides)
            except dp.BudgetExceededError as exc:
                print(f"fedcore: error: {exc}", file=sys.stderr)
                return 2
            print(tuned.summary())
            return 0
        if args.command != "run":
            return _deploy(args)
        config = _load(args, args.config)
        from .experiment import run_experiment

        outcome = run_experiment(config, resume=args.resume)
    except FedcoreError as exc:
        print(f"fedcore: error: {exc}", file=sys.stderr)
        return 2
    print(outcome.summary())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
