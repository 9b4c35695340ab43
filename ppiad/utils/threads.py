"""How many CPU threads Paddle's math library (MKL + OpenMP/oneDNN in the CPU wheel) uses, and setting it.

Why this exists: `import paddle` sets OMP_NUM_THREADS=1 when it is unset (paddle/base/__init__.py), so by
default every Paddle matmul runs on one core, whatever the machine has. ppiad's default instead is the
machine's physical cores (those this process may run on), divided by the processes a
`paddle.distributed.launch` run starts on this machine (PADDLE_LOCAL_SIZE, else PADDLE_TRAINERS_NUM), so
that N processes together use every core once and do not oversubscribe them.

Precedence, highest first:
1. `runtime.cpu_threads` > 0 in the config (applied by `configure`, called by every tool after loading it);
2. OMP_NUM_THREADS set by the user before ppiad (and Paddle) was imported;
3. the default above.

How: `paddle.base.core.set_num_threads(n)`, Paddle's own setter (MKL_Set_Num_Threads + omp_set_num_threads
on the calling thread, the thread that runs eager ops), measured to set both libraries' counts (Paddle 3.3.1).
`import ppiad` arranges for it to run right after Paddle's own import (`install`), or at once when Paddle is
already loaded. Setting OMP_NUM_THREADS before Paddle loads would work too, but Paddle then prints
"WARNING: OMP_NUM_THREADS set to N, not 1 ... PLEASE USE OMP_NUM_THREADS WISELY" on every start (it warns
because data-parallel processes that each use every core slow each other down, which the per-process division
above avoids), and that would break every tool's one-line error messages. Paddle leaves OMP_NUM_THREADS=1 in
the environment; ppiad removes it again when the user had not set it, so child processes start like this one.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.abc
import importlib.util
import os
import sys
from typing import Optional

ENV = "OMP_NUM_THREADS"
# OMP_NUM_THREADS as the user gave it (None: unset), read when ppiad was imported before Paddle; Paddle
# overwrites the variable at import, so it is remembered here.
_user_env: Optional[str] = None
_user_env_known = False


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads of one core count once).

    Read from /sys/devices/system/cpu/cpu*/topology (Linux); elsewhere, or when that is unreadable, the
    number of usable logical CPUs.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{base}/physical_package_id") as f:
                package = f.read().strip()
            with open(f"{base}/core_id") as f:
                core = f.read().strip()
        except OSError:
            return max(1, len(cpus))
        cores.add((package, core))
    return max(1, len(cores))


def local_processes() -> int:
    """Processes of this job on this machine: PADDLE_LOCAL_SIZE (set by paddle.distributed.launch), else
    PADDLE_TRAINERS_NUM, else 1."""
    for var in ("PADDLE_LOCAL_SIZE", "PADDLE_TRAINERS_NUM"):
        try:
            n = int(os.environ.get(var, "") or 0)
        except ValueError:
            n = 0
        if n > 0:
            return n
    return 1


def default_threads() -> int:
    """Physical cores // local processes, at least 1."""
    return max(1, physical_cores() // local_processes())


def _parse_env(value: Optional[str]) -> Optional[int]:
    try:
        n = int(value) if value is not None else 0
    except ValueError:
        return None
    return n if n > 0 else None


def user_threads() -> Optional[int]:
    """OMP_NUM_THREADS as the user set it, or None if unset/invalid (or unknowable: Paddle imported first
    and the variable is Paddle's own "1")."""
    if _user_env_known:
        return _parse_env(_user_env)
    value = os.environ.get(ENV)
    if "paddle" in sys.modules and value == "1":
        return None  # most likely Paddle's own default; runtime.cpu_threads=1 asks for one thread explicitly
    return _parse_env(value)


def resolve(cpu_threads: int = 0) -> tuple[int, str]:
    """(threads, where the number came from: "config", "OMP_NUM_THREADS" or "default")."""
    if cpu_threads and cpu_threads > 0:
        return int(cpu_threads), "config"
    user = user_threads()
    if user is not None:
        return user, ENV
    return default_threads(), "default"


def install() -> None:
    """Called by `import ppiad`: remember the user's OMP_NUM_THREADS, and apply `configure(0)` as soon as
    Paddle is imported (now, if it already is)."""
    global _user_env, _user_env_known
    if "paddle" in sys.modules:
        configure(0)
        return
    _user_env, _user_env_known = os.environ.get(ENV), True
    if not any(isinstance(f, _AfterPaddleImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterPaddleImport())


class _AfterPaddleImport(importlib.abc.MetaPathFinder):
    """Finds `paddle` like the normal finders do, and runs `_after_paddle_import` once it has executed."""

    def find_spec(self, name, path=None, target=None):
        if name != "paddle":
            return None
        sys.meta_path.remove(self)  # once, and the normal finders do the lookup
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _after_paddle_import()

        spec.loader.exec_module = exec_module
        return spec


def _after_paddle_import() -> None:
    if _user_env is None:
        os.environ.pop(ENV, None)  # Paddle's "1", not the user's: children should choose afresh
    configure(0)


def configure(cpu_threads: int = 0) -> int:
    """Apply the thread count `resolve(cpu_threads)` gives to Paddle's math library when Paddle is loaded;
    returns it. Raises ValueError for a negative count."""
    if cpu_threads is not None and cpu_threads < 0:
        raise ValueError(f"runtime.cpu_threads must be >= 0 (0 = automatic), got {cpu_threads}")
    n, _ = resolve(cpu_threads or 0)
    if "paddle" in sys.modules and hasattr(sys.modules["paddle"], "base"):
        from paddle.base import core

        core.set_num_threads(n)
    return n


def math_library_threads() -> dict:
    """Thread counts the loaded math libraries report: {"mkl": n, "openmp": n} (keys only for libraries
    found in Paddle's wheel). Loads Paddle. For tests and benchmarks."""
    import paddle

    libs = os.path.join(os.path.dirname(paddle.__file__), "libs")
    out = {}
    for key, pattern, getter in (("mkl", "libmklml_intel.so*", "MKL_Get_Max_Threads"),
                                 ("openmp", "libiomp5.so*", "omp_get_max_threads")):
        paths = sorted(glob.glob(os.path.join(libs, pattern)))
        if paths:
            out[key] = int(getattr(ctypes.CDLL(paths[0]), getter)())
    return out
