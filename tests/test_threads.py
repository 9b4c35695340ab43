"""The CPU thread setting reaches Paddle's math library (MKL and OpenMP report the count), in a fresh process
each time: the count is fixed when Paddle loads."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Asks the libraries in Paddle's wheel themselves (not ppiad's code) for their thread counts.
REPORT = """
import ctypes, glob, os, paddle
libs = os.path.join(os.path.dirname(paddle.__file__), "libs")
mkl = ctypes.CDLL(glob.glob(os.path.join(libs, "libmklml_intel.so*"))[0])
omp = ctypes.CDLL(glob.glob(os.path.join(libs, "libiomp5.so*"))[0])
print(json.dumps({"mkl": mkl.MKL_Get_Max_Threads(), "openmp": omp.omp_get_max_threads()}))
"""


def run(code: str, **env_changes) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PADDLE_LOCAL_SIZE", "PADDLE_TRAINERS_NUM")}
    env.update(env_changes)
    proc = subprocess.run([sys.executable, "-c", "import json, sys\n" + code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def expected_default(local: int = 1) -> int:
    from ppiad.utils.threads import physical_cores

    return max(1, physical_cores() // local)


def test_paddle_alone_uses_one_thread():
    # the behaviour ppiad corrects: without ppiad, Paddle's MKL and OpenMP run on one thread
    got = run("import paddle\n" + REPORT)
    assert got == {"mkl": 1, "openmp": 1}


def test_import_ppiad_first_uses_physical_cores():
    got = run("import ppiad\nimport paddle\n" + REPORT)
    n = expected_default()
    assert got == {"mkl": n, "openmp": n}


def test_cores_are_divided_among_launched_processes():
    got = run("import ppiad\nimport paddle\n" + REPORT, PADDLE_LOCAL_SIZE="2", PADDLE_TRAINERS_NUM="4")
    n = expected_default(2)
    assert got == {"mkl": n, "openmp": n}
    got = run("import ppiad\nimport paddle\n" + REPORT, PADDLE_TRAINERS_NUM="64")
    assert got == {"mkl": 1, "openmp": 1}


def test_user_environment_wins_over_the_default():
    # (MKL caps an environment request at the physical cores, so ask for fewer than the default)
    got = run("import ppiad\nimport paddle\n" + REPORT, OMP_NUM_THREADS="1")
    assert got == {"mkl": 1, "openmp": 1}
    if expected_default() > 2:
        got = run("import ppiad\nimport paddle\n" + REPORT, OMP_NUM_THREADS="2")
        assert got == {"mkl": 2, "openmp": 2}


def test_paddle_imported_before_ppiad_still_gets_the_default():
    got = run("import paddle\nimport ppiad\n" + REPORT)
    n = expected_default()
    assert got == {"mkl": n, "openmp": n}


def test_config_key_wins_after_paddle_is_loaded():
    def code(n):
        return ("import argparse, paddle\nfrom ppiad.utils.cli import config_from_args\n"
                f"config_from_args(argparse.Namespace(config=None, opt=['runtime.cpu_threads={n}']))\n" + REPORT)

    # MKL caps any request at the physical cores, so ask for at most that many
    n = expected_default()
    assert run(code(n), OMP_NUM_THREADS="1") == {"mkl": n, "openmp": n}   # over the user's environment
    assert run("import ppiad\n" + code(1)) == {"mkl": 1, "openmp": 1}     # and below the default


def test_negative_config_value_names_the_key():
    import argparse

    from ppiad.config import ConfigError
    from ppiad.utils.cli import config_from_args

    with pytest.raises(ConfigError, match="runtime.cpu_threads"):
        config_from_args(argparse.Namespace(config=None, opt=["runtime.cpu_threads=-2"]))


def test_resolve_precedence(monkeypatch):
    from ppiad.utils import threads

    monkeypatch.setattr(threads, "_user_env_known", True)
    monkeypatch.setattr(threads, "_user_env", "5")
    assert threads.resolve(0) == (5, "OMP_NUM_THREADS")
    assert threads.resolve(7) == (7, "config")
    monkeypatch.setattr(threads, "_user_env", None)
    monkeypatch.setenv("PADDLE_LOCAL_SIZE", "1")
    assert threads.resolve(0) == (threads.physical_cores(), "default")


def test_no_paddle_thread_warning_and_environment_left_as_found():
    # Paddle warns on stderr when OMP_NUM_THREADS > 1 at its import; ppiad sets the count after the import, so
    # tools keep one-line error messages, and Paddle's own OMP_NUM_THREADS=1 does not leak into child processes
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code = "import ppiad, paddle, os\nprint(os.environ.get('OMP_NUM_THREADS'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OMP_NUM_THREADS" not in proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "None"
