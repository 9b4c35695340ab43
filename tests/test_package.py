"""`pip install .` and `pip install -e .` give a working `ppiad` command and `python -m ppiad`.

The package is installed into a fresh virtualenv that sees this environment's packages through a .pth file,
with --no-deps --no-build-isolation, so the test is offline and takes seconds. It runs from a copy of the
sources (pip builds in the source tree) and from a directory outside the checkout, so what runs is the
installed package, not the working copy.
"""
import os
import shutil
import site
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, cwd, **kw):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    base = tmp_path_factory.mktemp("pkg")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "ppiad"), src / "ppiad", ignore=shutil.ignore_patterns("__pycache__"))
    env_dir = base / "venv"
    _run([sys.executable, "-m", "venv", str(env_dir)], cwd=base)
    py = env_dir / "bin" / "python"
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=base).stdout.strip()
    # This environment's packages (paddle, PIL, yaml, ...) become visible after the venv's own.
    with open(os.path.join(purelib, "ppiad_test_deps.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    return base, src, env_dir, py


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_pip_install_gives_the_ppiad_command(venv, editable):
    base, src, env_dir, py = venv
    pip = [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    _run(pip + (["-e", str(src)] if editable else [str(src)]), cwd=base)
    try:
        where = _run([str(py), "-c", "import ppiad; print(ppiad.__file__)"], cwd=base).stdout.strip()
        if editable:
            assert where == str(src / "ppiad" / "__init__.py")
        else:
            assert where.startswith(str(env_dir)) and "site-packages" in where
        out = _run([str(env_dir / "bin" / "ppiad"), "infer", "--help"], cwd=base).stdout
        assert out.startswith("usage: ppiad infer") and "--image" in out and "--adapter" in out
        out = _run([str(py), "-m", "ppiad", "--help"], cwd=base).stdout
        for command in ("train", "eval", "infer", "serve", "export", "prepare-data", "demo"):
            assert f"\n  {command} " in out
        # The package data the processor needs is installed too.
        _run([str(py), "-c", "import importlib.resources as r; "
                             "assert r.files('ppiad.models').joinpath('chat_template.jinja').is_file()"], cwd=base)
        # The configs ship too: `-c configs/<name>.yaml` works from a folder without configs/ (base has none).
        out = _run([str(py), "-c", "from ppiad.config import load_config; "
                                   "print(load_config('configs/demo.yaml').run_name)"], cwd=base).stdout
        assert out.strip() == "demo" and not (base / "configs").exists()
        bad = subprocess.run([str(env_dir / "bin" / "ppiad"), "nonsense"], cwd=base, capture_output=True, text=True)
        assert bad.returncode == 2 and "unknown command 'nonsense'" in bad.stderr
    finally:
        _run([str(py), "-m", "pip", "uninstall", "-q", "-y", "ppiad"], cwd=base)
