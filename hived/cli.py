"""`hivectl`: look at and steer a hive from a shell.

    hivectl [--connect ADDR] [--key-file PATH] status [--json]
    hivectl jobs [--json]
    hivectl drain NAME
    hivectl undrain NAME
    hivectl cancel JOB
    hivectl keygen [--force] PATH
    hivectl doctor [--config PATH] [--user NAME] [--json]
    hivectl completion bash|zsh|fish
    hivectl --version

Each command is one query to a node's control socket; any node drains,
undrains or cancels for the whole hive (it forwards to the node concerned).
`--json` output keeps the shape DESIGN.md fixes; scripts rely on it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Any

from hived import __version__
from hived.config import DEFAULT_CONFIG_PATH
from hived.errors import HiveError, RemoteProtocolError
from hived.net.addresses import local_control_addresses
from hived.net.security import client_curve
from hived.node.status import check_jobs, check_status, link_problems
from hived.protocol.control import (
    Answer,
    CancelRequest,
    DrainRequest,
    JobsQuery,
    Query,
    StatusQuery,
    UndrainRequest,
    ask,
)

TIMEOUT = 3.0
# What completion waits for node names and job ids: a shell must not hang on a TAB.
COMPLETION_TIMEOUT = 1.0
SHELLS = ("bash", "zsh", "fish")
_requests = itertools.count(1)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hivectl", description="Look at and steer a hived hive.")
    p.add_argument("--connect", metavar="ADDR", help="a node's control address (default: the local daemon)")
    p.add_argument("--key-file", metavar="PATH", help="cluster key, for a tcp:// address")
    p.add_argument("--version", action="version", version=f"hivectl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = sub.add_parser("status", help="the coordinator and every node")
    status.add_argument("--json", action="store_true")
    jobs = sub.add_parser("jobs", help="jobs running in the hive")
    jobs.add_argument("--json", action="store_true")
    drain = sub.add_parser("drain", help="let a node finish what it runs and take nothing new")
    drain.add_argument("name", help="the node's name, as `hivectl status` lists it")
    undrain = sub.add_parser("undrain", help="end a drain: the node takes work again")
    undrain.add_argument("name", help="the node's name")
    cancel = sub.add_parser("cancel", help="cancel a job: its caller gets hived.JobCancelled")
    cancel.add_argument("job", help="the job's id, as `hivectl jobs` lists it")
    keygen = sub.add_parser("keygen", help="write a new cluster key")
    keygen.add_argument("path")
    keygen.add_argument("--force", action="store_true", help="replace an existing key file")
    doctor = sub.add_parser("doctor", help="check this machine's set-up: config, key, daemon, seeds, clock")
    doctor.add_argument("--config", metavar="PATH",
                        help=f"the daemon's config file (default {DEFAULT_CONFIG_PATH}, where present)")
    doctor.add_argument("--json", action="store_true")
    doctor.add_argument("--user", metavar="NAME", default="hived",
                        help="the user the daemon runs as (default hived), to check it can read the key")
    completion = sub.add_parser("completion", help="print a shell completion script")
    completion.add_argument("shell", nargs="?", choices=SHELLS,
                            help="e.g. `source <(hivectl completion bash)` in ~/.bashrc")
    completion.add_argument("--words", choices=("nodes", "jobs"),
                            help="print the hive's node names or job ids, one a line (the scripts' own use)")
    return p


def _query(args: argparse.Namespace, query: Query, timeout: float = TIMEOUT) -> dict[str, Any]:
    named = args.connect or os.environ.get("HIVED_ADDRESS")
    addresses = [named] if named else local_control_addresses()
    answer: Answer | None = None
    for address in addresses:
        answer = ask(address, query, timeout, curve=client_curve(address, args.key_file))
        if answer is not None:
            break
    if answer is None:
        raise HiveError(
            f"no daemon answered at {' or '.join(addresses)}; is hived running? "
            "`systemctl status hived`"
        )
    if "error" in answer.body:
        raise HiveError(f"hived at {address}: {str(answer.body['error'])[:500]}")
    return answer.body


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    cells = [[str(row.get(key, "")) for key, _ in columns] for row in rows]
    widths = [max([len(title)] + [len(c[i]) for c in cells]) for i, (_, title) in enumerate(columns)]
    lines = ["  ".join(title.ljust(w) for (_, title), w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


NODE_COLUMNS = [
    ("name", "NAME"), ("address", "ADDRESS"), ("state", "STATE"), ("role", "ROLE"),
    ("cpus", "CPUS"), ("gpus", "GPUS"), ("slots_busy", "BUSY"), ("slots_free", "FREE"),
    ("tasks_done", "DONE"), ("load", "LOAD"), ("version", "VERSION"), ("protocol", "PROTOCOL"),
    ("uptime", "UPTIME"),
]
JOB_COLUMNS = [
    ("id", "JOB"), ("owner", "OWNER"), ("function", "FUNCTION"), ("queued", "QUEUED"),
    ("running", "RUNNING"), ("done", "DONE"), ("failed", "FAILED"), ("rate", "RATE/S"),
]


def status(args: argparse.Namespace) -> None:
    body = check_status(_query(args, StatusQuery(next(_requests))))
    if args.json:
        print(json.dumps(body, indent=2))
        return
    coordinator = body.get("coordinator")
    if coordinator:
        print(f"coordinator: {coordinator['name']} (term {coordinator['term']})")
    else:
        print("coordinator: none known (no valid lease seen from here)")
    rows = [dict(row, uptime=duration(row.get("uptime"))) for row in body["nodes"]]
    print(_table(rows, NODE_COLUMNS))
    for kind, row in link_problems(body):
        print(f"{kind} {row['address']} is {row['state']}: {row['why']}")


def duration(seconds: Any) -> str:
    """Seconds as a person reads them, one decimal and a unit: 3.4s, 12.0min,
    5.0h, 2.1d (no space: a table row stays one word a column); "-" if unknown."""
    if type(seconds) not in (int, float) or not 0 <= seconds < float("inf"):
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def jobs(args: argparse.Namespace) -> None:
    body = check_jobs(_query(args, JobsQuery(next(_requests))))
    if args.json:
        print(json.dumps(body, indent=2))
    elif not body["jobs"]:
        print("no jobs")
    else:
        print(_table(body["jobs"], JOB_COLUMNS))


def drain(args: argparse.Namespace) -> None:
    body = _query(args, DrainRequest(next(_requests), args.name))
    if body.get("draining") != args.name:
        raise RemoteProtocolError(f"the drain answer names {body.get('draining')!r}, not {args.name!r}")
    print(f"{args.name} is draining: it finishes what it runs and takes nothing new")


def undrain(args: argparse.Namespace) -> None:
    body = _query(args, UndrainRequest(next(_requests), args.name))
    if body.get("undrained") != args.name:
        raise RemoteProtocolError(f"the undrain answer names {body.get('undrained')!r}, not {args.name!r}")
    print(f"{args.name} takes work again")


def cancel(args: argparse.Namespace) -> None:
    body = _query(args, CancelRequest(next(_requests), args.job))
    if body.get("cancelled") != args.job:
        raise RemoteProtocolError(f"the cancel answer names {body.get('cancelled')!r}, not {args.job!r}")
    print(str(body.get("text", f"job {args.job} cancelled"))[:500])


def completion(args: argparse.Namespace) -> None:
    if args.words is not None:
        # For a TAB: what a daemon answers quickly, or nothing, and never an error.
        try:
            if args.words == "nodes":
                body = check_status(_query(args, StatusQuery(next(_requests)), COMPLETION_TIMEOUT))
                words = [row["name"] for row in body["nodes"]]
            else:
                body = check_jobs(_query(args, JobsQuery(next(_requests)), COMPLETION_TIMEOUT))
                words = [row["id"] for row in body["jobs"]]
        except (HiveError, OSError):
            return
        print("\n".join(w for w in words if w.isprintable() and " " not in w))
        return
    if args.shell is None:
        raise HiveError(f"completion for which shell? expected one of {', '.join(SHELLS)} "
                        "(`hivectl completion bash`)")
    from hived.completion import script

    print(script(args.shell, parser()), end="")


def keygen(args: argparse.Namespace) -> None:
    from hived.net.security import write_key

    try:
        write_key(args.path, replace=args.force)
    except FileExistsError:
        raise HiveError(
            f"{args.path} exists; refusing to replace the cluster key (nodes that keep the old "
            "one cannot talk to the others): pass --force to replace it, then copy it to every "
            "node and restart them all"
        ) from None
    print(f"wrote {args.path}; copy it to every node (mode 0640, owner root:hived) and set [security] key_file")


def doctor(args: argparse.Namespace) -> int:
    from hived.doctor import diagnose

    findings = diagnose(args.config, args.connect, args.key_file, args.user)
    failed = any(f.level == "FAIL" for f in findings)
    if args.json:
        checks = [{"level": f.level, "what": f.what, "fix": f.fix} for f in findings]
        print(json.dumps({"ok": not failed, "checks": checks}, indent=2))
    else:
        for finding in findings:
            print(finding.line())
    return 1 if failed else 0


COMMANDS = {
    "status": status, "jobs": jobs, "drain": drain, "undrain": undrain, "cancel": cancel,
    "keygen": keygen, "doctor": doctor, "completion": completion,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
    except HiveError as exc:
        print(f"hivectl: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"hivectl: {exc}", file=sys.stderr)
        return 1
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
