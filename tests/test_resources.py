"""hived.node.resources: CPUs, memory and GPUs on fake cgroup trees, fake nvidia-smi, and this machine."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from hived.errors import ConfigError
from hived.node import resources
from hived.node.resources import (
    cgroup_cpu_quota,
    cgroup_memory_limit,
    detect_gpus,
    memory_limit_bytes,
    parse_nvidia_smi_list,
    parse_visible_devices,
    resolve_gpus,
    total_memory,
    usable_cpus,
)

AFFINITY = len(os.sched_getaffinity(0))


def tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def roots(tmp_path: Path, proc_cgroup: str, files: dict[str, str]) -> tuple[str, str]:
    """A /proc and a /sys/fs/cgroup under tmp_path; returns (proc_root, cgroup_root)."""
    tree(tmp_path / "proc", {"self/cgroup": proc_cgroup})
    tree(tmp_path / "cg", files)
    (tmp_path / "cg").mkdir(exist_ok=True)
    return str(tmp_path / "proc"), str(tmp_path / "cg")


# --------------------------------------------------------------------------
# CPUs

V2 = "0::/system.slice/hived.service\n"


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        (
            {
                "cgroup.controllers": "cpu memory",
                "system.slice/hived.service/cpu.max": "max 100000",
            },
            None,
        ),
        ({"cgroup.controllers": "", "system.slice/hived.service/cpu.max": "150000 100000"}, 1.5),
        ({"cgroup.controllers": "", "system.slice/hived.service/cpu.max": "50000 100000"}, 0.5),
        # The parent's limit binds its children too: the tightest ancestor wins.
        (
            {
                "cgroup.controllers": "",
                "system.slice/cpu.max": "100000 100000",
                "system.slice/hived.service/cpu.max": "300000 100000",
            },
            1.0,
        ),
        # No cpu.max anywhere (controller not enabled): no limit.
        ({"cgroup.controllers": "", "system.slice/hived.service/cgroup.procs": ""}, None),
        # Garbage is ignored rather than trusted.
        ({"cgroup.controllers": "", "system.slice/hived.service/cpu.max": "x y"}, None),
    ],
)
def test_cgroup_v2_quota(tmp_path: Path, files: dict[str, str], quota: float | None) -> None:
    proc, cg = roots(tmp_path, V2, files)
    assert cgroup_cpu_quota(proc, cg) == quota


def test_usable_cpus_is_affinity_intersected_with_quota(tmp_path: Path) -> None:
    files = {"cgroup.controllers": "", "system.slice/hived.service/cpu.max": "150000 100000"}
    proc, cg = roots(tmp_path, V2, files)
    assert usable_cpus(proc, cg) == min(AFFINITY, 2)  # ceil(1.5)

    tree(tmp_path / "cg", {"system.slice/hived.service/cpu.max": "1 100000"})
    assert usable_cpus(proc, cg) == 1  # a tiny quota still leaves one worker

    tree(tmp_path / "cg", {"system.slice/hived.service/cpu.max": "6400000 100000"})
    assert usable_cpus(proc, cg) == AFFINITY  # a quota above the mask: the mask wins


def test_container_sees_its_own_cgroup_at_the_mount_root(tmp_path: Path) -> None:
    # /proc/self/cgroup names the host-side path, which does not exist under
    # the container's cgroup mount; the mount root is the container's cgroup.
    proc, cg = roots(
        tmp_path,
        "0::/kubepods/burstable/pod1/ctr\n",
        {"cgroup.controllers": "", "cpu.max": "200000 100000", "memory.max": "1073741824"},
    )
    assert cgroup_cpu_quota(proc, cg) == 2.0
    assert cgroup_memory_limit(proc, cg) == 2**30


def test_path_outside_the_cgroup_namespace(tmp_path: Path) -> None:
    proc, cg = roots(
        tmp_path, "0::/../../x\n", {"cgroup.controllers": "", "cpu.max": "100000 100000"}
    )
    assert cgroup_cpu_quota(proc, cg) == 1.0


@pytest.mark.parametrize(
    ("proc_cgroup", "files", "quota"),
    [
        # cpu and cpuacct co-mounted, as most distributions do.
        (
            "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n",
            {
                "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000",
                "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
            },
            2.5,
        ),
        # cpu alone (this build machine's layout), limit on an ancestor.
        (
            "1:cpu:/a/b\n",
            {
                "cpu/a/cpu.cfs_quota_us": "50000",
                "cpu/a/cpu.cfs_period_us": "100000",
                "cpu/a/b/cpu.cfs_quota_us": "-1",
                "cpu/a/b/cpu.cfs_period_us": "100000",
            },
            0.5,
        ),
        (
            "1:cpu:/\n",
            {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"},
            None,
        ),
        # Hybrid: v1 cpu controller next to an empty unified mount.
        (
            "1:cpu:/s\n0::/s\n",
            {
                "unified/cgroup.controllers": "",
                "unified/s/cgroup.procs": "",
                "cpu/s/cpu.cfs_quota_us": "100000",
                "cpu/s/cpu.cfs_period_us": "100000",
            },
            1.0,
        ),
    ],
)
def test_cgroup_v1_quota(
    tmp_path: Path, proc_cgroup: str, files: dict[str, str], quota: float | None
) -> None:
    proc, cg = roots(tmp_path, proc_cgroup, files)
    assert cgroup_cpu_quota(proc, cg) == quota


def test_no_cgroups_at_all(tmp_path: Path) -> None:
    proc, cg = str(tmp_path / "no-proc"), str(tmp_path / "no-cg")
    assert cgroup_cpu_quota(proc, cg) is None
    assert cgroup_memory_limit(proc, cg) is None
    assert usable_cpus(proc, cg) == AFFINITY


def test_this_machine() -> None:
    cpus = usable_cpus()
    assert 1 <= cpus <= AFFINITY <= (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    if quota is None:
        assert cpus == AFFINITY
    memory = total_memory()
    assert 0 < memory <= psutil.virtual_memory().total


# --------------------------------------------------------------------------
# Memory


def test_memory_limits(tmp_path: Path) -> None:
    physical = psutil.virtual_memory().total
    proc, cg = roots(
        tmp_path, V2, {"cgroup.controllers": "", "system.slice/hived.service/memory.max": "max"}
    )
    assert cgroup_memory_limit(proc, cg) is None
    assert total_memory(proc, cg) == physical

    tree(tmp_path / "cg", {"system.slice/memory.max": str(512 * 2**20)})
    assert total_memory(proc, cg) == min(physical, 512 * 2**20)

    proc, cg = roots(
        tmp_path / "v1",
        "9:memory:/job\n",
        {"memory/job/memory.limit_in_bytes": "9223372036854771712"},  # v1's "unlimited"
    )
    assert total_memory(proc, cg) == physical
    tree(tmp_path / "v1" / "cg", {"memory/job/memory.limit_in_bytes": str(2**30)})
    assert total_memory(proc, cg) == min(physical, 2**30)


@pytest.mark.parametrize(
    ("spec", "total", "limit"),
    [
        ("90%", 1000, 900),
        ("12.5%", 8 * 2**30, 2**30),
        ("100%", 1000, 1000),
        (0, 1000, None),
        ("0", 1000, None),
        ("0%", 1000, None),
        ("4GiB", 1, 4 * 2**30),  # an absolute size does not depend on total
        (123456, 1, 123456),
        ("512MB", 1, 512_000_000),
    ],
)
def test_memory_limit_bytes(spec: int | str, total: int, limit: int | None) -> None:
    assert memory_limit_bytes(spec, total) == limit


def test_memory_limit_bytes_refuses_nonsense() -> None:
    with pytest.raises(ConfigError, match=r'^pool.memory_limit: expected a percentage like "90%"'):
        memory_limit_bytes("lots", 1000)


# --------------------------------------------------------------------------
# GPUs

H100_X2 = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5a6b7c8d-1111-2222-3333-444455556666)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-0f0e0d0c-aaaa-bbbb-cccc-ddddeeeeffff)
"""
A100_MIG = """\
GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-e91edf3b-b297-37c1-a2a7-7601c3238fa2)
  MIG 3g.20gb     Device  0: (UUID: MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f)
  MIG 3g.20gb     Device  1: (UUID: MIG-cba663e8-9bed-5b7c-8b3c-6ea1a2f5d0f1)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-2f23f5ab-0f47-1b7e-2f4d-0e9d6e4c2a11)
"""


@pytest.mark.parametrize(
    ("value", "devices"),
    [
        ("", []),
        ("-1", []),
        ("0", ["0"]),
        ("1,0", ["1", "0"]),
        (" 2 , 3 ", ["2", "3"]),
        ("0,-1,1", ["0"]),  # CUDA stops at the first invalid entry
        ("GPU-5a6b7c8d-1111-2222-3333-444455556666", ["GPU-5a6b7c8d-1111-2222-3333-444455556666"]),
        (
            "MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f,0",
            ["MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f", "0"],
        ),
    ],
)
def test_cuda_visible_devices_is_respected(value: str, devices: list[str]) -> None:
    assert parse_visible_devices(value) == devices
    # Set for the daemon, it wins over NVML and nvidia-smi alike.
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": value, "PATH": "/nonexistent"}) == devices


def test_parse_nvidia_smi_list() -> None:
    assert parse_nvidia_smi_list(H100_X2) == [
        "GPU-5a6b7c8d-1111-2222-3333-444455556666",
        "GPU-0f0e0d0c-aaaa-bbbb-cccc-ddddeeeeffff",
    ]
    # A GPU split into MIG instances offers the instances, not itself.
    assert parse_nvidia_smi_list(A100_MIG) == [
        "MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f",
        "MIG-cba663e8-9bed-5b7c-8b3c-6ea1a2f5d0f1",
        "GPU-2f23f5ab-0f47-1b7e-2f4d-0e9d6e4c2a11",
    ]
    assert parse_nvidia_smi_list("GPU 0: Tesla K80\nGPU 1: Tesla K80\n") == ["0", "1"]
    assert parse_nvidia_smi_list("No devices were found\n") == []
    assert parse_nvidia_smi_list("") == []


def fake_nvidia_smi(bin_dir: Path, body: str) -> dict[str, str]:
    """An executable `nvidia-smi` shell script on PATH; returns the environ to use."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return {"PATH": str(bin_dir)}


def test_nvidia_smi_on_path(tmp_path: Path) -> None:
    # Only shell builtins: PATH holds nothing but the fake.
    body = '[ "$1" = "-L" ] || exit 2\nprintf \'%s\' "' + H100_X2 + '"\n'
    environ = fake_nvidia_smi(tmp_path / "bin", body)
    assert detect_gpus(environ, nvml=False) == [
        "GPU-5a6b7c8d-1111-2222-3333-444455556666",
        "GPU-0f0e0d0c-aaaa-bbbb-cccc-ddddeeeeffff",
    ]
    assert resolve_gpus("auto", environ) == detect_gpus(environ)
    assert resolve_gpus(0, environ) == []


def test_nvidia_smi_failing_means_no_gpus(tmp_path: Path) -> None:
    body = 'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."\nexit 9\n'
    environ = fake_nvidia_smi(tmp_path / "bin", body)
    assert detect_gpus(environ, nvml=False) == []


def test_no_nvidia_smi_means_no_gpus(tmp_path: Path) -> None:
    assert detect_gpus({"PATH": str(tmp_path)}, nvml=False) == []


def test_a_hung_nvidia_smi_is_given_up_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "NVIDIA_SMI_TIMEOUT", 0.3)
    environ = fake_nvidia_smi(tmp_path / "bin", "exec /bin/sleep 30\n")
    started = time.monotonic()
    assert detect_gpus(environ, nvml=False) == []
    assert time.monotonic() - started < 10


def test_resolve_gpus_with_a_count() -> None:
    # Fewer found than asked and no CUDA_VISIBLE_DEVICES: trust the operator.
    if resources._gpus_from_nvml():
        pytest.skip("NVML finds GPUs here; the ordinal fallback is not reached")
    assert resolve_gpus(2, {"PATH": "/nonexistent"}) == ["0", "1"]
    assert resolve_gpus(1, {"CUDA_VISIBLE_DEVICES": "3,5"}) == ["3"]
    with pytest.raises(
        ConfigError, match=r"^pool.gpus: expected at most 2 \(CUDA_VISIBLE_DEVICES="
    ):
        resolve_gpus(4, {"CUDA_VISIBLE_DEVICES": "3,5"})


def test_gpus_on_this_machine() -> None:
    # Whatever the machine has, detection answers quickly with distinct ids.
    started = time.monotonic()
    devices = detect_gpus()
    assert time.monotonic() - started < resources.NVIDIA_SMI_TIMEOUT + 5
    assert len(set(devices)) == len(devices)
    assert all(d and "," not in d for d in devices)
