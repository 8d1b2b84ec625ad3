"""The environment for a subprocess that must run this hived (a daemon, a client)."""

from __future__ import annotations

import os

import hived

__all__ = ["REPO", "child_env"]

# The directory that holds the `hived` package: this checkout, or site-packages.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(hived.__file__)))


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess that must run this checkout's hived."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HIVED_", "NOTIFY_", "WATCHDOG_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env
