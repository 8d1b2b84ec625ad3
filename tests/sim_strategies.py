"""Hypothesis settings and strategies for the property tests on the simulated
network (hived.testing.simnet)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st


# Hypothesis profiles for the simulated-network property tests: "sim" keeps
# the suite fast; HIVED_SIM_PROFILE=sim-thorough runs many more schedules.
def _profiles() -> settings:
    settings.register_profile(
        "sim",
        max_examples=500,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile("sim-thorough", settings.get_profile("sim"), max_examples=2000)
    return settings.get_profile(os.environ.get("HIVED_SIM_PROFILE", "sim"))


SIM_SETTINGS = _profiles()


def fault_schedules(
    run_for: float, max_size: int, leave: bool = False, stop: bool = False
) -> st.SearchStrategy[list[tuple]]:
    """A hypothesis strategy: random schedules of runs, kills, restarts,
    (leaves), (stops: a hand-over, the node draining until a later kill,
    restart or leave), partitions into 3 groups of up to 7 nodes, heals,
    disks that fill up and free again, and message fault rates (drop,
    duplicate, reorder); `SimNet.apply` applies each step."""
    node = st.integers(0, 6)
    ops = [
        st.tuples(st.just("run"), st.floats(0.01, run_for)),
        st.tuples(st.just("kill"), node),
        st.tuples(st.just("restart"), node),
        st.tuples(st.just("partition"), st.lists(st.integers(0, 2), min_size=7, max_size=7)),
        st.tuples(st.just("heal")),
        st.tuples(st.just("disk"), node, st.booleans()),
        st.tuples(st.just("faults"), st.floats(0, 0.3), st.floats(0, 0.2), st.floats(0, 0.5)),
    ]
    if leave:
        ops.insert(3, st.tuples(st.just("leave"), node))
    if stop:
        ops.insert(3, st.tuples(st.just("stop"), node))
    return st.lists(st.one_of(*ops), max_size=max_size)
