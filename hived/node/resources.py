"""What this machine offers the pool: CPUs, GPUs and memory, as a container sees them.

Theory of operation
-------------------
``os.cpu_count()`` and ``psutil.virtual_memory().total`` describe the host,
not what this process may use. A container or a systemd slice narrows both:

- **CPUs.** The affinity mask (cpusets, ``taskset``) limits *which* CPUs we
  may run on; the CFS quota (cgroup v2 ``cpu.max``, v1
  ``cpu.cfs_quota_us``/``cpu.cfs_period_us``) limits *how much* CPU time per
  period. Usable CPUs = min(len(affinity), ceil(quota / period)), at least 1.
  Starting more workers than that only makes them throttle each other.
- **Memory.** The cgroup limit (v2 ``memory.max``, v1
  ``memory.limit_in_bytes``), where lower than physical memory.

The process's own cgroup comes from ``/proc/self/cgroup``. Limits are
hierarchical, so every ancestor up to the mount root is read and the tightest
wins. Inside a container the mount root usually *is* our cgroup while
``/proc/self/cgroup`` still names the host-side path; when that path does not
exist under the mount we read the mount root alone. Both roots are parameters
so tests can build cgroup trees in a temporary directory.

- **GPUs.** One worker per device, pinned with ``CUDA_VISIBLE_DEVICES``. A
  ``CUDA_VISIBLE_DEVICES`` set for the daemon is respected as is; otherwise
  NVML (``pynvml``) when it loads, else ``nvidia-smi -L``, else none. Devices
  are named by UUID where known: CUDA numbers devices fastest-first unless
  ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so an NVML index can name a different
  device than the same CUDA index, while a UUID cannot. A GPU split into MIG
  instances offers each instance as its own device.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from hived.configschema import parse_memory_limit
from hived.errors import ConfigError

PROC_ROOT = "/proc"
CGROUP_ROOT = "/sys/fs/cgroup"
NVIDIA_SMI_TIMEOUT = 5.0  # seconds; a wedged driver must not hang daemon start-up


# --------------------------------------------------------------------------
# CPUs


def usable_cpus(proc_root: str = PROC_ROOT, cgroup_root: str = CGROUP_ROOT) -> int:
    """CPUs this process can keep busy: affinity mask ∩ cgroup CPU quota, at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no affinity API, and no cgroups either
        return max(1, os.cpu_count() or 1)
    quota = cgroup_cpu_quota(proc_root, cgroup_root)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cgroup_cpu_quota(proc_root: str = PROC_ROOT, cgroup_root: str = CGROUP_ROOT) -> float | None:
    """The tightest CFS quota over our cgroup and its ancestors, in CPUs; None = unlimited."""
    groups = _own_cgroups(proc_root)
    found: list[float] = []
    for d in _v2_limit_dirs(Path(cgroup_root), groups):
        # cgroup v2 cpu.max: "$MAX $PERIOD", $MAX may be "max" (no limit).
        fields = _read(d / "cpu.max").split()
        if len(fields) == 2 and fields[0] != "max":
            found.append(_ratio(fields[0], fields[1]))
    for mount, path in _v1_mounts(Path(cgroup_root), groups, "cpu"):
        for d in _limit_dirs(mount, path):
            quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
            if quota and period and not quota.startswith("-"):  # -1 = no limit
                found.append(_ratio(quota, period))
    found = [q for q in found if q > 0]
    return min(found) if found else None


def _ratio(quota: str, period: str) -> float:
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return 0.0  # unreadable: ignored by the caller


# --------------------------------------------------------------------------
# Memory


def total_memory(proc_root: str = PROC_ROOT, cgroup_root: str = CGROUP_ROOT) -> int:
    """Bytes of memory this process's cgroup may use: min(physical, cgroup limit)."""
    import psutil  # here: a client that never asks the memory does without it

    total = psutil.virtual_memory().total
    limit = cgroup_memory_limit(proc_root, cgroup_root)
    return min(total, limit) if limit is not None else total


def cgroup_memory_limit(proc_root: str = PROC_ROOT, cgroup_root: str = CGROUP_ROOT) -> int | None:
    """The tightest memory limit over our cgroup and its ancestors; None = unlimited."""
    groups = _own_cgroups(proc_root)
    found: list[int] = []
    for d in _v2_limit_dirs(Path(cgroup_root), groups):
        text = _read(d / "memory.max")
        if text.isdigit():  # "max" = no limit
            found.append(int(text))
    for mount, path in _v1_mounts(Path(cgroup_root), groups, "memory"):
        for d in _limit_dirs(mount, path):
            # v1 reports "no limit" as a huge page-rounded number; min() with
            # physical memory in total_memory() makes that harmless.
            text = _read(d / "memory.limit_in_bytes")
            if text.isdigit():
                found.append(int(text))
    return min(found) if found else None


def memory_limit_bytes(spec: int | str, total: int) -> int | None:
    """A [pool] memory_limit as bytes per worker; None = no limit.

    `spec` is what the config holds ("90%", a byte count, "4GiB", 0) and
    `total` the memory a percentage is of (normally `total_memory()`).
    """
    try:
        value = parse_memory_limit(spec)
    except ValueError as exc:
        raise ConfigError(f"pool.memory_limit: expected {exc}, got {spec!r}") from None
    if isinstance(value, str):  # "N%"
        value = int(total * float(value[:-1]) / 100)
    return value or None


# --------------------------------------------------------------------------
# GPUs


def detect_gpus(environ: Mapping[str, str] = os.environ, *, nvml: bool = True) -> list[str]:
    """Device ids to give one worker each via CUDA_VISIBLE_DEVICES.

    Order: the daemon's own CUDA_VISIBLE_DEVICES; NVML (if `nvml` and pynvml
    loads); `nvidia-smi -L` found on environ's PATH; none.
    """
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return parse_visible_devices(visible)
    if nvml:
        found = _gpus_from_nvml()
        if found is not None:
            return found
    return _gpus_from_nvidia_smi(environ)


def parse_visible_devices(value: str) -> list[str]:
    """CUDA_VISIBLE_DEVICES as CUDA reads it: "" or "-1" = none; stop at an invalid entry."""
    devices: list[str] = []
    for entry in value.split(","):
        entry = entry.strip()
        # CUDA ignores everything from the first invalid entry on; "-1" is the
        # conventional way to hide all devices, and is invalid in that sense.
        if not entry or entry.startswith("-"):
            break
        devices.append(entry)
    return devices


def resolve_cpus(spec: int | str) -> int:
    """A [pool] cpus setting as a slot count: "auto" = usable_cpus()."""
    return usable_cpus() if spec == "auto" else int(spec)


def resolve_gpus(spec: int | str, environ: Mapping[str, str] = os.environ) -> list[str]:
    """A [pool] gpus setting as the device ids, one GPU slot each.

    An integer n takes the first n devices found. Where fewer are found and
    the daemon was not given CUDA_VISIBLE_DEVICES, the operator knows better
    than our detection (no nvidia-smi on PATH, say) and ordinals 0..n-1 are
    used; with CUDA_VISIBLE_DEVICES set, asking for more than it allows is an
    error rather than a silent escape from it.
    """
    found = detect_gpus(environ)
    if spec == "auto":
        return found
    n = int(spec)
    if n <= len(found):
        return found[:n]
    if environ.get("CUDA_VISIBLE_DEVICES") is not None:
        raise ConfigError(
            f"pool.gpus: expected at most {len(found)} (CUDA_VISIBLE_DEVICES="
            f"{environ['CUDA_VISIBLE_DEVICES']!r} for the daemon), got {n}"
        )
    return [str(i) for i in range(n)]


def _gpus_from_nvml() -> list[str] | None:
    """UUIDs from NVML; None when pynvml is missing or the driver does not answer."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None
    try:
        devices: list[str] = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            migs = _nvml_mig_uuids(pynvml, handle)
            devices.extend(migs or [_text(pynvml.nvmlDeviceGetUUID(handle))])
        return devices
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _nvml_mig_uuids(pynvml: object, handle: object) -> list[str]:
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(handle)  # type: ignore[attr-defined]
        if current != pynvml.NVML_DEVICE_MIG_ENABLE:  # type: ignore[attr-defined]
            return []
        uuids = []
        for j in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):  # type: ignore[attr-defined]
            try:
                mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)  # type: ignore[attr-defined]
            except Exception:  # an empty MIG slot
                continue
            uuids.append(_text(pynvml.nvmlDeviceGetUUID(mig)))  # type: ignore[attr-defined]
        return uuids
    except Exception:  # no MIG support on this GPU or in this pynvml
        return []


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


_SMI_GPU = re.compile(r"^GPU (\d+): .*?(?:\(UUID: (\S+?)\))?\s*$")
_SMI_MIG = re.compile(r"^\s+MIG .*\(UUID: (\S+?)\)\s*$")


def _gpus_from_nvidia_smi(environ: Mapping[str, str]) -> list[str]:
    binary = shutil.which("nvidia-smi", path=environ.get("PATH", os.defpath))
    if binary is None:
        return []
    try:
        done = subprocess.run(
            [binary, "-L"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT,
            env=dict(environ),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    # Non-zero: "NVIDIA-SMI has failed because it couldn't communicate with
    # the NVIDIA driver" and the like; the machine offers no usable GPU.
    return parse_nvidia_smi_list(done.stdout) if done.returncode == 0 else []


def parse_nvidia_smi_list(output: str) -> list[str]:
    """Device ids from `nvidia-smi -L`: GPU UUIDs, or a GPU's MIG UUIDs where split.

    GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5a6b...)
      MIG 3g.40gb     Device  0: (UUID: MIG-1c2d...)
    """
    devices: list[str] = []
    gpu: str | None = None  # the last GPU line, until we know it has no MIG lines
    migs: list[str] = []

    def flush() -> None:
        if gpu is not None:
            devices.extend(migs or [gpu])

    for line in output.splitlines():
        if m := _SMI_GPU.match(line):
            flush()
            gpu, migs = m.group(2) or m.group(1), []
        elif (m := _SMI_MIG.match(line)) and gpu is not None:
            migs.append(m.group(1))
    flush()
    return devices


# --------------------------------------------------------------------------
# cgroup plumbing


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return ""


def _own_cgroups(proc_root: str) -> dict[str, tuple[str, str] | str]:
    """/proc/self/cgroup as {controller: (mount dir name, path)}, "" -> v2 path."""
    groups: dict[str, tuple[str, str] | str] = {}
    for line in _read(Path(proc_root) / "self" / "cgroup").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            groups[""] = path
        else:
            for c in controllers.split(","):
                groups[c] = (controllers, path)
    return groups


def _unified_mount(root: Path) -> Path | None:
    """The cgroup v2 mount: the root itself (v2 only) or root/unified (hybrid)."""
    for candidate in (root, root / "unified"):
        if (candidate / "cgroup.controllers").exists():
            return candidate
    return None


def _v2_limit_dirs(root: Path, groups: Mapping[str, tuple[str, str] | str]) -> list[Path]:
    """Our v2 cgroup's directory and its ancestors (leaf first); none without v2."""
    unified = _unified_mount(root)
    path = groups.get("")  # a str: the v2 entry's path (v1's are tuples)
    if unified is None or not isinstance(path, str):
        return []
    return _limit_dirs(unified, path)


def _v1_mounts(
    root: Path, groups: Mapping[str, tuple[str, str] | str], controller: str
) -> list[tuple[Path, str]]:
    entry = groups.get(controller)
    if not isinstance(entry, tuple):
        return []
    dirname, path = entry
    # Co-mounted controllers live in "cpu,cpuacct" (with "cpu" as a symlink on
    # most distributions); try the exact name first.
    for name in (dirname, controller):
        if (root / name).is_dir():
            return [(root / name, path)]
    return []


def _limit_dirs(mount: Path, path: str) -> list[Path]:
    """Our cgroup's directory and each ancestor up to the mount, leaf first."""
    rel = path.strip("/")
    if ".." in rel.split("/"):  # outside our cgroup namespace: only the mount root is ours
        return [mount]
    leaf = mount / rel if rel else mount
    if not leaf.is_dir():
        return [mount]
    dirs = [leaf]
    while dirs[-1] != mount:
        dirs.append(dirs[-1].parent)
    return dirs
