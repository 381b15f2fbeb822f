"""The ``dm`` command. Every listing takes ``--json``; errors are one clear line and a named exit code."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dm.errors import ConfigError, DMError, RegistryUnavailable, UnknownAlgorithm, UnknownDeployment
from dm.models import FINAL_STATES, RUNNING
from dm.settings import Settings, ensure_home, mask_url, read_stack_state
from dm.status import DEFAULT_LIMIT, counted, node_rows, recent_events

#: exit codes
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_FAILED = 4
EXIT_UNAVAILABLE = 5
EXIT_TIMEOUT = 6


def _settings() -> Settings:
    return Settings.from_env()


def _control() -> Any:
    from dm.control import Control

    return Control(_settings())


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str, sort_keys=True))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


# -- commands ---------------------------------------------------------------------


def cmd_up(a: argparse.Namespace) -> int:
    from dm import launcher

    os.umask(0o077)  # every file dm's processes write under DM_HOME is their owner's alone (0600)
    settings = _settings().with_(**({"min_nodes": a.nodes} if a.nodes is not None else {}))
    if settings.embedded and (settings.redis_url or settings.mongo_url):
        raise ConfigError("set both DM_REDIS_URL and DM_MONGO_URL, or neither (for the embedded stack)")
    stop = {"now": False}

    def on_signal(_sig: int, _frame: Any) -> None:
        stop["now"] = True

    launcher.up(
        settings,
        flower=not a.no_flower,
        flower_address=a.flower_address,
        flower_port=a.flower_port,
        bridge=not a.no_bridge,
        metrics_address=a.metrics_address,
        metrics_port=None if a.no_metrics else a.metrics_port,
        sentinel=a.sentinel,
    )
    if a.detach:
        print("detached: `dm down` stops it")
        return EXIT_OK
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print("running; Ctrl-C stops it")
    while not stop["now"]:
        time.sleep(0.2)
    print("stopping ...")
    launcher.down(settings.home)
    print("stopped")
    return EXIT_OK


def cmd_down(a: argparse.Namespace) -> int:
    from dm import launcher

    home = _settings().home
    if not launcher.down(home):
        print(f"nothing to stop under {home}")
    else:
        print("stopped")
    return EXIT_OK


def cmd_node(a: argparse.Namespace) -> int:
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    if any(arg == "--hollow" or arg.startswith("--hollow=") for arg in rest):
        from workers import hollow  # N simulated nodes in this process (for scale tests)

        return hollow.main(rest)
    from workers.agent import main

    rest = node_env_file(a.rest[1:] if a.rest[:1] == ["--"] else a.rest)
    os.umask(0o077)  # what the agent writes (logs, fence file, work dirs) is its owner's alone
    ensure_home(_settings().home)
    return main(rest)


def node_env_file(argv: list[str]) -> list[str]:
    """``--env-file PATH`` (``-``: standard input) sets ``DM_*`` variables from ``KEY=value`` lines,
    so credentials reach a node without being on its command line, where every user sees them.
    Returns the other args (the URLs the file gives passed on in-process, not on a command line)."""
    rest, path = list(argv), None
    for i, arg in enumerate(rest):
        if arg == "--env-file" and i + 1 < len(rest):
            path = rest[i + 1]
            del rest[i : i + 2]
            break
        if arg.startswith("--env-file="):
            path = arg.partition("=")[2]
            del rest[i]
            break
    if path is None:
        return rest
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read --env-file {path}: {exc.strerror or exc}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not key.startswith("DM_"):
            raise ConfigError(f"--env-file {path} line {number}: expected DM_NAME=value")
        os.environ[key.strip()] = value.strip()
    # dm.app read the environment when it was imported: the agent's --redis/--mongo update it
    for flag, var in (("--redis", "DM_REDIS_URL"), ("--mongo", "DM_MONGO_URL")):
        if os.environ.get(var) and flag not in rest:
            rest += [flag, os.environ[var]]
    return rest


def cmd_algorithms_add(a: argparse.Namespace) -> int:
    from dm.capacity import check_demand, largest_node
    from dm.package import load_spec, pack

    ctl = _control()
    added = []
    if largest_node(ctl.settings, ctl.registry) is None:
        print(f"dm: note: provider {ctl.settings.provider!r} has no node registered yet, so no algorithm's "
              "cpu and memory can be checked against a node size now", file=sys.stderr)  # fmt: skip
    for directory in _package_dirs(a.dirs):
        spec = load_spec(directory)
        check_demand(spec.name, spec.demand, ctl.settings, ctl.registry)  # never-fitting demand: refused now
        archive, sha = pack(directory)
        doc = ctl.registry.add_algorithm(spec, archive, sha)
        added.append({"name": doc["name"], "version": doc["version"], "sha256": doc["sha256"], "size": doc["size"]})
    if a.json:
        _print_json(added)
    else:
        for row in added:
            print(f"added {row['name']} {row['version']} ({row['size']} bytes, sha256 {row['sha256'][:12]})")
    return EXIT_OK


def _package_dirs(paths: list[str]) -> list[Path]:
    """Each path is a package, or a folder of packages (like examples/algorithms)."""
    dirs: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and not (path / "algorithm.toml").exists():
            found = sorted(p.parent for p in path.glob("*/algorithm.toml"))
            if found:
                dirs.extend(found)
                continue
        dirs.append(path)
    return dirs


def cmd_algorithms_list(a: argparse.Namespace) -> int:
    rows = []
    for doc in _control().registry.list_algorithms():
        spec = doc["spec"]
        rows.append(
            {
                "name": doc["name"],
                "version": doc["version"],
                "cpu": spec["demand"]["cpu"],
                "memory": spec["demand"]["memory"],
                "restart": spec["restart"]["policy"],
                "sha256": doc["sha256"],
                "description": spec.get("description", ""),
            }
        )
    if a.json:
        _print_json(rows)
    else:
        _table(rows, ["name", "version", "cpu", "memory", "restart", "description"])
    return EXIT_OK


def _parse_args(pairs: list[str]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise DMError(f"--arg takes key=value, got {pair!r}")
        try:
            args[key] = json.loads(raw)
        except ValueError:
            args[key] = raw
    return args


def cmd_deploy(a: argparse.Namespace) -> int:
    from dm.tasks import deploy

    args = _parse_args(a.arg or [])
    if a.args_json:
        args.update(json.loads(a.args_json))
    result = deploy.delay(a.name, args=args, request_id=a.request_id, version=a.version, keep_for=a.keep_for)
    try:
        dep = result.get(timeout=a.timeout, propagate=True)
    finally:
        result.forget()
    if not a.wait:
        _show_deployment(dep, a.json)
        return EXIT_OK
    return _wait(dep["id"], a.until, a.timeout, a.json)


def _wait(dep_id: str, until: str, timeout: float, as_json: bool) -> int:
    ctl = _control()
    deadline = time.monotonic() + timeout
    last = None
    while True:
        doc = ctl.registry.get_deployment(dep_id)
        seen = (doc["state"], doc.get("node"), doc["generation"])
        if seen != last and not as_json:
            node = f" on node-{doc['node']}" if doc.get("node") else ""
            print(f"{dep_id}: {doc['state']}{node} ({doc.get('reason') or ''})", flush=True)
            last = seen
        if doc["state"] in FINAL_STATES or (until == "running" and doc["state"] == RUNNING):
            break
        if time.monotonic() > deadline:
            print(f"still {doc['state']} after {timeout:g}s", file=sys.stderr)
            return EXIT_TIMEOUT
        time.sleep(0.1)
    if as_json:
        from dm.deployer import public

        _print_json(public(doc))
    return EXIT_FAILED if doc["state"] == "failed" else EXIT_OK


def _show_deployment(dep: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(dep)
    else:
        node = f" on node-{dep['node']}" if dep.get("node") else ""
        print(f"{dep['id']}: {dep['state']}{node} ({dep.get('reason') or ''})")


def cmd_stop(a: argparse.Namespace) -> int:
    from dm import deployer

    ctl = _control()
    for dep_id in a.ids:
        _show_deployment(deployer.public(deployer.stop(ctl.ports, dep_id)), a.json)
    return EXIT_OK


def cmd_nodes(a: argparse.Namespace) -> int:
    rows = node_rows(_control())
    if not a.all:
        rows = [r for r in rows if r["state"] not in ("stopped",)]
    if a.json:
        _print_json(rows)
    else:
        columns = ["name", "host", "address", "state", "cpus", "memory", "cpu", "ram", "load", "deployments"]
        _table(rows, [*columns, "containment", "run_as"])
    return EXIT_OK


def cmd_deployments(a: argparse.Namespace) -> int:
    from dm.deployer import public
    from dm.status import deployment_usage, list_deployments

    ctl = _control()

    if a.limit < 1:
        raise DMError(f"--limit must be at least 1, got {a.limit}; --all lists every deployment")
    docs = list_deployments(
        ctl,
        states=a.state.split(",") if a.state else None,
        node=a.node,
        algorithm=a.algorithm,
        service=a.service,
        limit=0 if a.all else a.limit,
        before=a.before,
    )
    rows = [public(d) for d in docs]
    # what each uses now, as its node measured it (containment: its cgroup)
    usage = deployment_usage(ctl, sorted({str(r["node"]) for r in rows if r.get("node")}))
    for row in rows:
        used = usage.get(row["id"]) if row["state"] in ("running", "restarting") else None
        row["cpu_used"] = round(float(used["cpu"]), 3) if used else None
        row["memory_used"] = round(float(used["memory"]), 1) if used else None
    if a.json:
        _print_json(rows)
        return EXIT_OK
    _table(rows, ["id", "algorithm", "version", "state", "node", "generation", "restarts", "cpu_used",
                  "memory_used", "reason"])  # fmt: skip
    if not a.all and len(rows) == a.limit:
        print(f"(the newest {a.limit}; older ones: --before {docs[-1]['created_at']!r}, or --all)")
    return EXIT_OK


def _event_row(e: dict[str, Any]) -> dict[str, Any]:
    return {
        "time": time.strftime("%H:%M:%S", time.localtime(e["time"])) + f".{int(e['time'] * 1000) % 1000:03d}",
        "deployment": e["deployment_id"],
        "algorithm": e.get("algorithm"),
        "state": e["state"],
        "node": e.get("node"),
        "generation": e["generation"],
        "reason": e.get("reason"),
    }


def cmd_events(a: argparse.Namespace) -> int:
    ctl = _control()
    from dm.registry import EventCursor

    cursor = EventCursor(ctl.registry, {"deployment_id": a.deployment} if a.deployment else None)
    cursor.last = ctl.registry.events_mark()  # read first: what follows the listing is after it
    events = ctl.registry.list_events(a.deployment, limit=a.limit) if a.deployment else recent_events(ctl, a.limit)
    for e in events:
        _print_event(e, a.json)
    # a deployment's listing comes from its own history, which may be ahead of the relay
    shown = {(e["deployment_id"], e["rev"]) for e in events}
    while a.follow:
        time.sleep(0.3)
        for e in cursor.poll():
            if (e["deployment_id"], e["rev"]) not in shown:
                _print_event(e, a.json)
        shown.clear()  # the cursor has passed them all by now
    return EXIT_OK


def _print_event(e: dict[str, Any], as_json: bool) -> None:
    row = _event_row(e)
    if as_json:
        print(json.dumps({**row, "time": e["time"]}), flush=True)
    else:
        node = f" node-{row['node']}" if row["node"] else ""
        print(f"{row['time']} {row['deployment']} {row['algorithm']} {row['state']}{node} "
              f"gen {row['generation']}: {row['reason']}", flush=True)  # fmt: skip


def endpoints(settings: Settings) -> dict[str, str | None]:
    """Where the system's servers are, passwords masked: the stores from the settings, Flower
    and the metrics exporter as `dm up` recorded them (None: not known here)."""
    recorded = read_stack_state(settings.home).get("endpoints") or {}
    return {
        "redis": mask_url(settings.redis_url) or None,
        "mongo": mask_url(settings.mongo_url) or None,
        "kafka": mask_url(settings.kafka_bootstrap) or None,
        "flower": mask_url(recorded.get("flower") or "") or None,
        "metrics": mask_url(recorded.get("metrics") or "") or None,
    }


def cmd_status(a: argparse.Namespace) -> int:
    from dm import health

    ctl = _control()
    nodes = [n for n in node_rows(ctl) if n["state"] != "stopped"]
    counts, how = counted(ctl)
    events = [_event_row(e) for e in recent_events(ctl, a.events)]
    where = endpoints(ctl.settings)
    store = health.control_store(ctl)
    if a.json:
        _print_json({"endpoints": where, "control_store": store, "nodes": nodes, "deployments": counts,
                     "deployments_counted_by": how, "events": events})  # fmt: skip
        return EXIT_OK
    print("ENDPOINTS  " + "  ".join(f"{k}: {v or '-'}" for k, v in where.items()))
    print("CONTROL STORE  " + health.summary(store))
    print("\nNODES")
    _table(nodes, ["name", "host", "state", "cpu", "ram", "load", "deployments"])
    by = "  (counted by the relay, a moment behind)" if how == "relay" else ""
    print("\nDEPLOYMENTS  " + ("  ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "(none)") + by)
    print("\nLAST EVENTS")
    for row in events:
        node = f" node-{row['node']}" if row["node"] else ""
        print(f"  {row['time']} {row['deployment']} {row['state']}{node}: {row['reason']}")
    return EXIT_OK


def cmd_watch(a: argparse.Namespace) -> int:
    import contextlib
    import io

    from dm import watch

    def render() -> str:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            cmd_status(argparse.Namespace(json=False, events=a.events))
        return buf.getvalue()

    return watch.run(render, a.interval)


def cmd_metrics(a: argparse.Namespace) -> int:
    from dm import metrics

    return metrics.serve(_settings(), a.port, a.address, say=lambda m: print(m, flush=True))


def cmd_logs(a: argparse.Namespace) -> int:
    doc = _control().registry.get_deployment(a.id)
    path = doc.get("log")
    if not path:
        raise DMError(f"deployment {a.id} has no log yet (state {doc['state']}); try again when it runs")
    log_path = Path(path)
    if not log_path.exists():
        raise DMError(f"the log of {a.id} is on node-{doc.get('node')}'s host at {path}, not here")
    with open(log_path, "rb") as f:
        sys.stdout.write(f.read().decode(errors="replace"))
        sys.stdout.flush()
        while a.follow:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            else:
                time.sleep(0.2)
    return EXIT_OK


# -- parser -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dm", description="dm: deploy algorithms onto the least-loaded node.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str, json_: bool = False) -> Any:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=func)
        if json_:
            sp.add_argument("--json", action="store_true", help="print JSON")
        return sp

    sp = add("up", cmd_up, "start the whole local system (embedded servers when no DM_*_URL is set)")
    sp.add_argument("--detach", action="store_true", help="return once it is ready; `dm down` stops it")
    sp.add_argument("--nodes", type=int, help="nodes to start (default: min_nodes)")
    sp.add_argument("--flower-address", default="127.0.0.1")
    sp.add_argument("--flower-port", type=int, default=5555)
    sp.add_argument("--no-flower", action="store_true")
    sp.add_argument("--no-bridge", action="store_true", help="do not start the Kafka bridge")
    sp.add_argument("--metrics-address", default="127.0.0.1", help="where `dm metrics` listens")
    sp.add_argument("--metrics-port", type=int, default=9464, help="port of dm's Prometheus /metrics")
    sp.add_argument("--no-metrics", action="store_true", help="do not start the metrics exporter")
    sp.add_argument("--sentinel", action="store_true",
                    help="embedded Redis as a primary, a replica and three Sentinels (docs/operations.md)")  # fmt: skip
    add("down", cmd_down, "stop what `dm up` started")
    sp = add("node", cmd_node, "run one node agent (see `dm node -- --help`)")
    sp.add_argument("rest", nargs=argparse.REMAINDER)

    sp = sub.add_parser("algorithms", help="add or list algorithms in the repository")
    asub = sp.add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    x = asub.add_parser("add", help="validate, pack and store algorithm directories")
    x.add_argument("dirs", nargs="+", metavar="DIR")
    x.add_argument("--json", action="store_true")
    x.set_defaults(func=cmd_algorithms_add)
    x = asub.add_parser("list", help="list stored algorithms")
    x.add_argument("--json", action="store_true")
    x.set_defaults(func=cmd_algorithms_list)

    sp = add("deploy", cmd_deploy, "deploy an algorithm", json_=True)
    sp.add_argument("name")
    sp.add_argument("--arg", action="append", metavar="KEY=VALUE", help="an arg (value parsed as JSON if it can be)")
    sp.add_argument("--args-json", metavar="JSON", help="args as one JSON object")
    sp.add_argument("--version")
    sp.add_argument("--request-id")
    sp.add_argument("--keep-for", metavar="DURATION", help="how long a cut-off node keeps it running (30s, 2h; "
                    "default: the algorithm's [disconnect] keep_for)")  # fmt: skip
    sp.add_argument("--wait", action="store_true", help="wait and show progress until it ends")
    sp.add_argument("--until", choices=["final", "running"], default="final", help="with --wait: what to wait for")
    sp.add_argument("--timeout", type=float, default=60.0)
    sp = add("stop", cmd_stop, "stop deployments", json_=True)
    sp.add_argument("ids", nargs="+", metavar="ID")
    sp = add("status", cmd_status, "nodes, deployments by state and the last events", json_=True)
    sp.add_argument("--events", type=int, default=10)
    sp = add("watch", cmd_watch, "`dm status`, redrawn every --interval seconds until Ctrl-C")
    sp.add_argument("--interval", type=float, default=1.0)
    sp.add_argument("--events", type=int, default=10)
    sp = add("metrics", cmd_metrics, "serve dm's Prometheus metrics on /metrics until Ctrl-C")
    sp.add_argument("--port", type=int, default=9464)
    sp.add_argument("--address", default="127.0.0.1", help="listen address (0.0.0.0: every interface)")
    sp = add("nodes", cmd_nodes, "list nodes", json_=True)
    sp.add_argument("--all", action="store_true", help="include stopped nodes")
    sp = add("deployments", cmd_deployments, "list deployments, newest first", json_=True)
    sp.add_argument("--state", help="comma-separated states")
    sp.add_argument("--node", help="a node id")
    sp.add_argument("--algorithm", help="an algorithm name")
    sp.add_argument("--service", help="a service name")
    sp.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help=f"rows (default {DEFAULT_LIMIT})")
    sp.add_argument("--all", action="store_true", help="every deployment (reads them all)")
    sp.add_argument("--before", type=float, metavar="TIME", help="created before TIME (the next page)")
    sp = add("events", cmd_events, "deployment events", json_=True)
    sp.add_argument("deployment", nargs="?")
    sp.add_argument("--follow", "-f", action="store_true")
    sp.add_argument("--limit", type=int, default=50)
    sp = add("logs", cmd_logs, "an algorithm's output")
    sp.add_argument("id")
    sp.add_argument("--follow", "-f", action="store_true")
    sp = add("bridge", cmd_bridge, "run the Kafka bridge: dm.requests -> deployments, their events -> dm.events")
    sp.add_argument("--bootstrap", help="Kafka bootstrap servers (default: DM_KAFKA_BOOTSTRAP or the `dm up` stack)")
    return p


#: set by :func:`main` for a command that only reads (see :func:`program`)
_reads_only = False


def program() -> None:
    """The ``dm`` command: :func:`main`, then the exit. A command that only reads ends as soon as
    its output is written: the MongoDB client's monitor threads would otherwise hold the exit
    for up to half a second (PyMongo joins them at exit, and they wake every 0.5 s), more than
    `dm status` takes to read."""
    code = main()
    if _reads_only:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BrokenPipeError:
            pass
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    global _reads_only
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["node"]:  # the agent parses its own options (`dm node --cpus 2 ...`)
        return cmd_node(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    _reads_only = args.func in (cmd_status, cmd_nodes, cmd_deployments, cmd_events, cmd_logs, cmd_algorithms_list)
    try:
        return int(args.func(args))
    except (UnknownAlgorithm, UnknownDeployment) as exc:
        print(f"dm: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except RegistryUnavailable as exc:
        print(f"dm: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except DMError as exc:
        print(f"dm: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR
    except BrokenPipeError:  # the reader went away (`dm status | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        name = type(exc).__name__
        if name in ("TimeoutError",):
            print(f"dm: timed out: {exc}", file=sys.stderr)
            return EXIT_TIMEOUT
        if name in ("OperationalError", "ConnectionError", "ServerSelectionTimeoutError"):
            print(f"dm: cannot reach the servers ({exc}); is `dm up` running?", file=sys.stderr)
            return EXIT_UNAVAILABLE
        raise


def cmd_bridge(a: argparse.Namespace) -> int:
    """The Kafka bridge in the foreground (more options: `python -m bridge --help`, DM_BRIDGE_*)."""
    from bridge.main import main as bridge_main

    return bridge_main(["--bootstrap", a.bootstrap] if a.bootstrap else [])
