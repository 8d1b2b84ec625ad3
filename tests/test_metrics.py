"""`[metrics] bind`: a real daemon's figures, checked by promtool, counted
exactly, refused when misconfigured, and served on through hostile clients."""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import Daemon

import hived
from hived.service.metrics import CLIENT_TIMEOUT, MAX_CLIENTS, MAX_REQUEST
from hived.testing.waiting import wait_for


def square(x: int) -> int:
    return x * x


def fails(x: int) -> int:
    raise ValueError(f"no {x}")


def dies(_: int = 0) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def metrics_daemon(make_daemon, tmp_path: Path, *args: str, bind: str = '"127.0.0.1:0"') -> Daemon:
    config = tmp_path / f"metrics-{len(list(tmp_path.iterdir()))}.toml"
    config.write_text(f"[metrics]\nbind = {bind}\n")
    return make_daemon("--config", str(config), *args)


def metrics_url(daemon: Daemon) -> str:
    found = wait_for(
        lambda: re.search(r"metrics: serving (http://\S+/metrics)", daemon.log), 10,
        what=f"the metrics address in the log:\n{daemon.log}",
    )
    return found.group(1)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return answer.read().decode()


def samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value, for every sample line."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            found[series] = float(value)
    return found


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":  # .ci/run installs it: missing there is a failure
            pytest.fail("promtool is not installed (Debian: apt-get install prometheus)")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return path


def test_the_figures_pass_promtool_and_count_exactly_the_tasks_run(make_daemon, tmp_path) -> None:
    daemon = metrics_daemon(make_daemon, tmp_path)
    url = metrics_url(daemon)
    text = scrape(url)
    check = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    before = samples(text)
    build = f'hived_build_info{{version="{hived.__version__}",python="{platform.python_version()}"}}'
    assert before[build] == 1
    assert before['hived_slots{kind="cpu",state="free"}'] == 2
    assert before['hived_slots{kind="gpu",state="free"}'] == 0
    assert before["hived_coordinator_term"] >= 1 and before["hived_coordinator"] == 1
    assert before["hived_elections_won_total"] == 1

    with hived.connect(daemon.address) as h:
        assert list(h.map(square, range(137))) == [x * x for x in range(137)]
        raised = [h.submit(fails, x) for x in range(3)]
        assert all(isinstance(f.exception(timeout=30), ValueError) for f in raised)
    after = samples(scrape(url))
    assert after["hived_tasks_completed_total"] - before["hived_tasks_completed_total"] == 140
    assert after['hived_tasks_failed_total{reason="raised"}'] == 3
    assert after['hived_tasks_failed_total{reason="crashed"}'] == 0
    assert after["hived_tasks_retried_total"] == 0
    assert after["hived_worker_crashes_total"] == 0
    assert after['hived_slots{kind="cpu",state="busy"}'] == 0
    assert daemon.stop() == 0  # the metrics server ends with the daemon


def test_a_task_that_kills_its_worker_counts_crashes_retries_and_one_failure(
    make_daemon, tmp_path
) -> None:
    daemon = metrics_daemon(make_daemon, tmp_path)
    url = metrics_url(daemon)
    with hived.connect(daemon.address) as h:
        with pytest.raises(hived.WorkerCrashed):  # retries=1: two runs, two dead workers
            list(h.map(dies, [0], retries=1))
    after = samples(scrape(url))
    assert after["hived_worker_crashes_total"] == 2
    assert after["hived_tasks_retried_total"] == 1
    assert after['hived_tasks_failed_total{reason="crashed"}'] == 1
    assert after["hived_tasks_completed_total"] == 0


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[metrics]\nbind = ":9641"\n', "metrics.bind"),
        ('[metrics]\nbind = "127.0.0.1:99999"\n', "metrics.bind"),
        ("[metrics]\nbind = false\n", "metrics.bind"),
        ('[metrics]\nport = 9641\n', "metrics.port"),
    ],
)
def test_a_bad_metrics_key_stops_the_daemon_with_one_line(tmp_path, text: str, key: str) -> None:
    from test_daemon import run_hived

    config = tmp_path / "hived.toml"
    config.write_text(text)
    out = run_hived("--config", str(config), "--control", f"ipc://{tmp_path}/s")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"hived: {config}: {key}: expected "), lines[0]


def test_a_metrics_port_in_use_stops_the_daemon_naming_the_key(make_daemon, tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        second = make_daemon("--config", _config(tmp_path, f'"127.0.0.1:{port}"'), start=False)
        second.start(wait=False)
        assert second.proc.wait(30) == 2
    assert f"metrics.bind: cannot serve at 127.0.0.1:{port}" in second.log
    assert "worker" not in second.log  # refused before any worker started


def _config(tmp_path: Path, bind: str) -> str:
    path = tmp_path / "port.toml"
    path.write_text(f"[metrics]\nbind = {bind}\n")
    return str(path)


def _answer(url: str, request: bytes, wait: float = 10) -> bytes:
    """What the server sends back for the raw `request`, until it closes."""
    host, port = re.match(r"http://([^/]+):(\d+)/", url).groups()
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        try:
            s.sendall(request)
        except OSError:  # it closed on us mid-send: what it said is still there
            pass
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        return got


def _cut_off(s: socket.socket) -> bool:
    try:
        return s.recv(100) == b""
    except ConnectionResetError:  # closed with a reset: nothing was left to say
        return True


def test_hostile_clients_get_an_error_and_the_daemon_serves_on(make_daemon, tmp_path) -> None:
    daemon = metrics_daemon(make_daemon, tmp_path)
    url = metrics_url(daemon)
    host, port = re.match(r"http://([^/]+):(\d+)/", url).groups()
    assert _answer(url, b"\x00\xff junk \r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert _answer(url, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert _answer(url, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    head = _answer(url, b"HEAD /metrics HTTP/1.0\n\n")  # bare LFs are accepted
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    huge = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * (4 * MAX_REQUEST) + b"\r\n\r\n"
    assert _answer(url, huge).startswith(b"HTTP/1.1 431 ")
    many = b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * MAX_REQUEST + b"\r\n"
    assert _answer(url, many).startswith(b"HTTP/1.1 431 ")

    # Slow clients (one byte, then nothing) up to the limit, and one more.
    slow = [socket.create_connection((host, int(port)), timeout=30) for _ in range(MAX_CLIENTS)]
    started = time.monotonic()
    try:
        for s in slow:
            s.sendall(b"G")
        wait_for(lambda: _answer(url, b"GET /metrics HTTP/1.1\r\n\r\n", wait=2) == b"", 5,
                 what="a client past the limit to be closed at once", ignore=OSError)  # fmt: skip
        assert daemon.status()["nodes"][0]["name"] == "testnode"  # the node is undisturbed
        for s in slow:  # each is cut off after CLIENT_TIMEOUT
            assert _cut_off(s)
        assert time.monotonic() - started < CLIENT_TIMEOUT + 5
    finally:
        for s in slow:
            s.close()
    # Random bytes: cut off once the time is up, or a 400 where they hold a head's end.
    noise = _answer(url, os.urandom(MAX_REQUEST // 2))
    assert noise == b"" or noise.startswith(b"HTTP/1.1 400 "), noise[:80]
    assert "hived_tasks_completed_total" in scrape(url)
    with hived.connect(daemon.address) as h:
        assert list(h.map(square, range(20))) == [x * x for x in range(20)]
    assert "Traceback" not in daemon.log


def test_two_daemons_see_each_other_in_their_figures(make_daemon, tmp_path) -> None:
    first = metrics_daemon(make_daemon, tmp_path, "--cpus", "1")
    advertised = wait_for(lambda: re.search(r"mesh: testnode at (tcp://\S+),", first.log), 10,
                          what="the first daemon's mesh address").group(1)  # fmt: skip
    second = metrics_daemon(make_daemon, tmp_path, "--cpus", "1", "--name", "other",
                            "--seed", advertised)  # fmt: skip
    urls = [metrics_url(first), metrics_url(second)]

    def agreed() -> list[dict[str, float]] | None:
        figures = [samples(scrape(url)) for url in urls]
        alive = all(f['hived_peers{state="alive"}'] == 1 for f in figures)
        terms = {f["hived_coordinator_term"] for f in figures}
        beats = all(
            f.get(f'hived_mesh_{way}_bytes_total{{type="M.BEAT"}}', 0) > 0
            for f in figures for way in ("received", "sent")
        )  # fmt: skip
        return figures if alive and beats and len(terms) == 1 and 0 not in terms else None

    figures = wait_for(agreed, 30, what="both daemons to agree on a coordinator and beat")
    assert sum(f["hived_coordinator"] for f in figures) == 1
    assert sum(f["hived_elections_won_total"] for f in figures) >= 1
