"""`hivectl` as a shell user and a script meet it, against a real daemon."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

import hived
from hived.cli import duration
from hived.net.security import load_key
from hived.protocol.wire import PROTOCOL_MAJOR, PROTOCOL_MINOR
from hived.testing.childenv import child_env
from hived.testing.waiting import wait_for

NODE_FIELDS = {
    "name": str,
    "address": str,
    "state": str,
    "role": str,
    "cpus": int,
    "gpus": int,
    "slots_busy": int,
    "slots_free": int,
    "tasks_done": int,
    "version": str,
}
JOB_FIELDS = {"owner": str, "queued": int, "running": int, "done": int, "failed": int}


def hivectl(
    *args: str, address: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess:
    connect = ["--connect", address] if address else []
    return subprocess.run(
        [sys.executable, "-m", "hived.cli", *connect, *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(*args: str, address: str) -> str:
    out = hivectl(*args, address=address)
    assert out.returncode == 0, f"hivectl {' '.join(args)}: {out.stderr}"
    return out.stdout


def square(x: int) -> int:
    return x * x


def held(release: str) -> int:
    """Runs until the test creates `release` (or a minute passes)."""
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.getpid()


def test_status_table_has_the_node_row(daemon) -> None:
    out = ok("status", address=daemon.address)
    lines = out.splitlines()
    assert lines[0] == "coordinator: testnode (term 1)"
    header = lines[1].split()
    assert header[:4] == ["NAME", "ADDRESS", "STATE", "ROLE"]
    for title in ("CPUS", "GPUS", "BUSY", "FREE", "DONE", "LOAD", "VERSION", "PROTOCOL", "UPTIME"):
        assert title in header
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == 1
    row = dict(zip(header, rows[0], strict=True))
    assert row["NAME"] == "testnode"
    assert row["ADDRESS"].startswith("tcp://127.0.0.1:")  # the address peers dial
    assert row["STATE"] == "alive"
    assert row["CPUS"] == "2" and row["GPUS"] == "0"
    assert row["VERSION"] == hived.__version__
    assert row["PROTOCOL"] == f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}"


def check_status_shape(body: dict) -> dict:
    """The documented `status --json` shape; returns the one node's row."""
    assert {"coordinator", "nodes"} <= set(body)
    coordinator = body["coordinator"]
    assert coordinator is None or set(coordinator) == {"name", "term"}
    if coordinator is not None:
        assert type(coordinator["name"]) is str and type(coordinator["term"]) is int
    assert isinstance(body["nodes"], list) and len(body["nodes"]) == 1
    node = body["nodes"][0]
    for key, kind in NODE_FIELDS.items():
        assert key in node, f"status --json: a node lacks {key!r}"
        assert type(node[key]) is kind, f"{key}: expected {kind.__name__}, got {node[key]!r}"
    assert node["state"] in {"alive", "suspect", "dead", "draining"}
    return node


def test_status_json_shape_and_tasks_done(daemon) -> None:
    body = json.loads(ok("status", "--json", address=daemon.address))
    node = check_status_shape(body)
    assert body["coordinator"] == {"name": "testnode", "term": 1}
    assert node["name"] == "testnode"
    assert node["address"].startswith("tcp://127.0.0.1:")
    assert node["state"] == "alive"
    assert node["role"] == "coordinator"
    assert (node["cpus"], node["gpus"]) == (2, 0)
    assert (node["slots_busy"], node["slots_free"]) == (0, 2)
    assert node["version"] == hived.__version__
    before = node["tasks_done"]

    with hived.connect(daemon.address) as h:
        assert list(h.map(square, range(30))) == [x * x for x in range(30)]
    after = check_status_shape(json.loads(ok("status", "--json", address=daemon.address)))
    assert after["tasks_done"] >= before + 30


def test_jobs_show_a_running_job(daemon, tmp_path) -> None:
    assert ok("jobs", address=daemon.address).strip() == "no jobs"
    assert json.loads(ok("jobs", "--json", address=daemon.address)) == {"jobs": []}
    release = str(tmp_path / "release")
    results: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with hived.connect(daemon.address) as h:
                results.extend(h.map(held, [release] * 6, chunksize=1, timeout=90))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    client = threading.Thread(target=run)
    client.start()
    try:

        def running_job() -> dict | None:
            rows = json.loads(ok("jobs", "--json", address=daemon.address))["jobs"]
            return rows[0] if rows and rows[0]["running"] == 2 else None

        job = wait_for(running_job, 30, what="the job to be running on both slots")
        for key, kind in JOB_FIELDS.items():
            assert type(job[key]) is kind, f"{key}: expected {kind.__name__}, got {job[key]!r}"
        assert isinstance(job["rate"], (int, float))
        assert job["owner"] == "testnode"
        assert job["done"] == 0 and job["failed"] == 0
        assert job["queued"] >= 1  # the window holds more than the two running

        table = ok("jobs", address=daemon.address).splitlines()
        assert table[0].split() == [
            "JOB",
            "OWNER",
            "FUNCTION",
            "QUEUED",
            "RUNNING",
            "DONE",
            "FAILED",
            "RATE/S",
        ]
        assert len(table) == 2
        assert table[1].split()[1:3] == ["testnode", "held"]
    finally:
        open(release, "w").close()
        client.join(90)
    assert not errors, errors
    assert len(results) == 6
    wait_for(
        lambda: ok("jobs", address=daemon.address).strip() == "no jobs",
        10,
        what="the finished job to leave the list",
    )


def test_drain_refuses_new_jobs(daemon) -> None:
    # connected before the drain: its next job is refused, and it finds no other node
    before = hived.connect(daemon.address, reconnect_timeout=0)
    out = ok("drain", "testnode", address=daemon.address)
    assert "testnode is draining" in out
    node = check_status_shape(json.loads(ok("status", "--json", address=daemon.address)))
    assert node["state"] == "draining"
    assert "draining" in ok("status", address=daemon.address).splitlines()[2]
    with before as h:
        with pytest.raises(hived.HiveUnavailable, match="testnode is draining and takes no new jobs"):
            list(h.map(square, range(3)))
        with pytest.raises(hived.HiveUnavailable, match="draining"):
            h.submit(square, 3).result(timeout=30)
    # a client looking for a node passes a draining one over
    with pytest.raises(hived.HiveUnavailable, match="hived on testnode is draining"):
        hived.connect(daemon.address)


def test_drain_of_an_unknown_node_fails(daemon) -> None:
    out = hivectl("drain", "nosuch", address=daemon.address)
    assert out.returncode != 0
    assert "nosuch" in out.stderr and "no node named" in out.stderr
    assert (
        json.loads(ok("status", "--json", address=daemon.address))["nodes"][0]["state"] == "alive"
    )


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["jobs"], ["drain", "x"]])
def test_no_daemon_answering(tmp_path, command) -> None:
    out = hivectl(*command, address=f"ipc://{tmp_path}/nobody.sock")
    assert out.returncode != 0
    assert "is hived running" in out.stderr
    assert out.stdout == ""


def test_no_daemon_answering_on_a_dead_socket_file(daemon) -> None:
    # A socket file that no process listens on (the daemon was killed -9).
    address = daemon.address
    daemon.kill()
    out = hivectl("status", address=address)
    assert out.returncode != 0
    assert "is hived running" in out.stderr


def test_keygen_writes_a_private_key(tmp_path) -> None:
    path = tmp_path / "keys" / "cluster.key"
    out = hivectl("keygen", str(path))
    assert out.returncode == 0, out.stderr
    assert str(path) in out.stdout
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = load_key(str(path))
    assert len(key.public) == 40 and len(key.secret) == 40


def test_keygen_keeps_an_existing_key_unless_forced(tmp_path) -> None:
    # Re-running the step would split the hive at the next restart.
    path = tmp_path / "cluster.key"
    assert hivectl("keygen", str(path)).returncode == 0
    first, public = path.read_text(), load_key(str(path)).public
    out = hivectl("keygen", str(path))
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.splitlines() == [
        f"hivectl: {path} exists; refusing to replace the cluster key (nodes that keep the old "
        "one cannot talk to the others): pass --force to replace it, then copy it to every "
        "node and restart them all"
    ]
    assert path.read_text() == first
    assert os.listdir(tmp_path) == ["cluster.key"]  # no temporary file left behind
    out = hivectl("keygen", "--force", str(path))
    assert out.returncode == 0, out.stderr
    assert load_key(str(path)).public != public
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_undrain_ends_a_drain_and_the_node_takes_work_again(daemon) -> None:
    ok("drain", "testnode", address=daemon.address)
    assert "draining (asked by testnode via hivectl)" in daemon.log
    assert "testnode takes work again" in ok("undrain", "testnode", address=daemon.address)
    assert "drain ended (asked by testnode via hivectl)" in daemon.log
    node = check_status_shape(json.loads(ok("status", "--json", address=daemon.address)))
    assert node["state"] == "alive"
    with hived.connect(daemon.address) as h:
        assert list(h.map(square, range(5))) == [0, 1, 4, 9, 16]
    # an undrain of a node that is not draining is no error either
    assert hivectl("undrain", "testnode", address=daemon.address).returncode == 0


def test_a_node_draining_to_stop_cannot_be_undrained(daemon, tmp_path) -> None:
    release = tmp_path / "release"
    with hived.connect(daemon.address, reconnect_timeout=0) as h:
        running = h.submit(held, str(release))
        wait_for(lambda: daemon.status()["nodes"][0]["slots_busy"] == 1, 30,
                 what="the task to run")
        daemon.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM: draining" in daemon.log, 10, what="the drain to begin")
        out = hivectl("undrain", "testnode", address=daemon.address)
        assert out.returncode == 1 and out.stdout == ""
        assert out.stderr.strip().endswith("hived on testnode is stopping; it cannot take work again")
        release.touch()
        assert running.result(timeout=30) > 0  # the drain went on: its task finished
    assert daemon.proc.wait(30) == 0, daemon.log


@pytest.mark.parametrize("command", ["drain", "undrain"])
def test_an_unknown_node_is_one_error_naming_the_known_ones(daemon, command) -> None:
    out = hivectl(command, "nosuch", address=daemon.address)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [
        f"hivectl: hived at {daemon.address}: no node named 'nosuch' in this hive (this node "
        "is 'testnode'); the nodes it knows: testnode"
    ]


def test_cancel_of_a_running_job_fails_its_map_at_once(daemon, tmp_path) -> None:
    release = str(tmp_path / "release")  # never made: the tasks would run a minute
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with hived.connect(daemon.address) as h:
                list(h.map(held, [release] * 6, chunksize=1, timeout=90))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    client = threading.Thread(target=run)
    client.start()
    try:
        rows = wait_for(lambda: json.loads(ok("jobs", "--json", address=daemon.address))["jobs"],
                        30, what="the job to be listed")
        job = rows[0]["id"]
        out = ok("cancel", job, address=daemon.address)
        cancelled = time.monotonic()
        assert out.strip() == f"job {job} cancelled on its owner testnode"
        client.join(30)
        assert time.monotonic() - cancelled < 5, "the map went on after its job was cancelled"
    finally:
        open(release, "w").close()
        client.join(90)
    assert len(errors) == 1 and isinstance(errors[0], hived.JobCancelled), errors
    assert isinstance(errors[0], concurrent.futures.CancelledError)
    assert f"job {job} was cancelled (`hivectl cancel` on testnode)" in str(errors[0])
    assert f"job {job} (held, client " in daemon.log and "cancelled (asked by testnode" in daemon.log
    wait_for(lambda: json.loads(ok("status", "--json", address=daemon.address))["nodes"][0]
             ["slots_busy"] == 0, 10, what="the cancelled tasks' slots to be free")
    with hived.connect(daemon.address) as h:  # the node serves the next job
        assert list(h.map(square, range(5))) == [0, 1, 4, 9, 16]


def test_cancel_of_an_unknown_job_lists_the_jobs_there_are(daemon) -> None:
    out = hivectl("cancel", "nosuch/1", address=daemon.address)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [
        f"hivectl: hived at {daemon.address}: no job 'nosuch/1' in this hive; the jobs it has: "
        "none (`hivectl jobs`)"
    ]


def test_every_row_shows_uptime_with_a_unit(daemon) -> None:
    lines = ok("status", address=daemon.address).splitlines()
    row = dict(zip(lines[1].split(), lines[2].split(), strict=True))
    assert re.fullmatch(r"\d+\.\d(s|min|h|d)", row["UPTIME"]), row["UPTIME"]
    node = check_status_shape(json.loads(ok("status", "--json", address=daemon.address)))
    assert type(node["uptime"]) is float and node["uptime"] >= 0


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0.0s"), (3.44, "3.4s"), (59.9, "59.9s"), (720, "12.0min"), (18000, "5.0h"),
     (181440, "2.1d"), (None, "-"), ("1", "-"), (-1, "-"), (float("nan"), "-")],
)
def test_durations_read_as_people_read_them(seconds, shown) -> None:
    assert duration(seconds) == shown


def complete(line: str, address: str | None = None) -> list[str]:
    """What bash offers for `line` (the word being completed is its last), with
    the script `hivectl completion bash` prints loaded and hivectl this checkout's."""
    script = hivectl("completion", "bash").stdout
    words = line.split(" ")
    program = (
        f'hivectl() {{ {sys.executable} -m hived.cli "$@"; }}\n{script}\n'
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        '_hivectl; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    out = subprocess.run(["bash", "-c", program], env=child_env(), capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    return [w for w in out.stdout.splitlines() if w]


def test_bash_loads_the_completion_and_completes_commands_and_options() -> None:
    script = hivectl("completion", "bash").stdout
    out = subprocess.run(["bash", "-c", f"{script}\ncomplete -p hivectl"], capture_output=True,
                         text=True, timeout=30)
    assert out.stdout.strip() == "complete -F _hivectl hivectl", out.stderr
    assert complete("hivectl dr") == ["drain"]
    assert complete("hivectl un") == ["undrain"]
    assert complete("hivectl status --j") == ["--json"]
    assert complete("hivectl completion ") == ["--help", "--words", "bash", "zsh", "fish"]
    assert complete("hivectl --connect ipc:///x s") == ["status"]


def test_bash_completes_node_names_and_job_ids_from_the_daemon(daemon) -> None:
    assert complete(f"hivectl --connect {daemon.address} drain t") == ["testnode"]
    assert complete(f"hivectl --connect {daemon.address} cancel ") == ["--help"]  # no jobs
    # no daemon: the commands' options only, at once and without an error
    started = time.monotonic()
    assert complete("hivectl --connect ipc:///nonexistent/x.sock undrain ") == ["--help"]
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_each_shell_gets_a_script_naming_every_command(shell) -> None:
    out = hivectl("completion", shell)
    assert out.returncode == 0 and out.stderr == ""
    for command in ("status", "jobs", "drain", "undrain", "cancel", "keygen", "doctor"):
        assert command in out.stdout
    assert "completion --words nodes" in out.stdout


@pytest.mark.skipif(shutil.which("zsh") is None, reason="no zsh here (.ci/run installs it)")
def test_zsh_loads_the_completion_through_bashcompinit() -> None:
    # Under bashcompinit the function runs in sh emulation (0-based arrays)
    # and zsh itself narrows the words to the prefix typed.
    program = (
        f'hivectl() {{ {sys.executable} -m hived.cli "$@" }}\n'
        "autoload -U compinit && compinit -u\n"
        "source <(hivectl completion zsh)\n"
        "print -r -- $_comps[hivectl]\n"
        "emulate sh -c 'COMP_WORDS=(hivectl status --j); COMP_CWORD=2; _hivectl; "
        'printf "%s\\n" "${COMPREPLY[@]}"\'\n'
    )
    out = subprocess.run(["zsh", "-fc", program], env=child_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.splitlines() == ["_bash_complete -F _hivectl", "--help", "--json"]


@pytest.mark.skipif(shutil.which("fish") is None, reason="no fish here (.ci/run installs it)")
def test_fish_loads_the_completion_and_completes_commands_and_options() -> None:
    program = (
        f"function hivectl; {sys.executable} -m hived.cli $argv; end\n"
        "hivectl completion fish | source\n"
        "complete -C 'hivectl dr'; complete -C 'hivectl status --j'\n"
    )
    out = subprocess.run(["fish", "-c", program], env=child_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.splitlines() == [
        "drain\tlet a node finish what it runs and take nothing new", "--json"]


def test_completion_without_a_shell_says_which_there_are() -> None:
    out = hivectl("completion")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == ("hivectl: completion for which shell? expected one of bash, zsh, fish "
                          "(`hivectl completion bash`)\n")
