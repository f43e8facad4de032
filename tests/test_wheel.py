"""The installed package, not the source tree: build a wheel, install it into a fresh venv, run the CLI.

What a user gets from ``pip install``: every package and subpackage (sdecor.cli.bench, sdecor_kernels, ...)
in the wheel with the compiled extension, the ``sdecor`` console script, and ``sdecor info``,
``sdecor demo --quick`` and ``sdecor bench --quick`` working from a folder outside the source tree.

Kept fast and offline:

* the wheel is built with this interpreter's torch (``pip wheel --no-build-isolation --no-deps``) from
  a copy of the source tree without build outputs (no build/, no .so, no egg-info), so nothing stale
  or copied from the development install can reach the wheel;
* C++ part only (``USE_CUDA=0``): on a busy 2-core CPU the wheel built in 52 s that way and in
  214 s with the CUDA part (nvcc for sm_80 and sm_90), more than this test may cost. The CUDA
  part's build is tested by the development install (``make`` builds it whenever a toolkit is
  found; test_native_build.py checks its cubins), and the packaging is the same for both;
* the fresh venv gets the wheel with ``--no-deps --no-index``; torch, numpy and the extras' packages
  come from this interpreter's site-packages through a .pth file instead of a multi-GB reinstall. A
  path added by a .pth line is put on sys.path but its own .pth files are not run, so the editable
  install of the development environment is not active there; the test checks that sdecor, its
  extension and sdecor_kernels are imported from the fresh venv.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import source_modules

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# not part of a source distribution: build outputs, environments, caches, results of local runs
IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__",
                                "*.so", "*.pyd", ".pytest_cache", "sdecor-*-output")
# setup.py builds the extension whenever it finds a C++ compiler (and installs without it otherwise)
HAS_CXX = any(shutil.which(c) for c in (os.environ.get("CXX") or "c++", "g++", "clang++"))
BUILD_TIMEOUT_S = 900        # 1-1.5 min on a 2-core CPU; generous for a loaded machine
RUN_TIMEOUT_S = 600


def _env(**extra):
    """This environment without anything that would put the source tree or a test setting in effect."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "TRITON_INTERPRET", "SDECOR_BACKEND")}
    env.update(extra)
    return env


def _run(cmd, cwd, timeout=RUN_TIMEOUT_S, env=None):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or _env(), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist = tmp / "src", tmp / "dist"
    shutil.copytree(ROOT, src, ignore=IGNORE, symlinks=True)
    env = _env(USE_CPP="1", USE_CUDA="0", FORCE_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
          "--wheel-dir", dist, "."], cwd=src, timeout=BUILD_TIMEOUT_S, env=env)
    wheels = list(dist.glob("sdecor-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh venv with the wheel installed; torch & co. from this interpreter's site-packages."""
    tmp = tmp_path_factory.mktemp("venv")
    env_dir = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", env_dir], cwd=tmp)
    py = env_dir / "bin" / "python"
    # this interpreter's pip installs into the fresh venv (pip >= 22.3), before the .pth below
    # exists: the development install of sdecor is not visible to it then
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", wheel], cwd=tmp)
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip()
    ours = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    Path(site, "_sdecor_test_dependencies.pth").write_text("".join(p + "\n" for p in ours))
    return env_dir


def test_wheel_holds_every_package_and_the_extension(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = source_modules()
    assert {"sdecor/__init__.py", "sdecor/cli/__init__.py", "sdecor/cli/bench/__init__.py",
            "sdecor_kernels/__init__.py"} <= modules
    assert modules <= names, f"not in the wheel: {sorted(modules - names)}"
    assert any(n.startswith("sdecor/cli/bench/") and n.endswith(".py") for n in names)
    extension = [n for n in names if n.startswith("sdecor/_C") and n.endswith(".so")]
    assert len(extension) == (1 if HAS_CXX else 0), sorted(names)
    tops = {n.split("/")[0] for n in names if not n.startswith("sdecor-")}
    assert tops == {"sdecor", "sdecor_kernels"}, f"unexpected top-level entries: {sorted(tops)}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "sdecor = sdecor.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_package_is_imported_from_the_venv(venv, tmp_path):
    modules = ["sdecor", "sdecor.cli.bench", "sdecor_kernels"] + (["sdecor._C"] if HAS_CXX else [])
    code = (f"import json, sys, torch, {', '.join(modules)}; "
            f"print(json.dumps(dict(files={{m: sys.modules[m].__file__ for m in {modules!r}}}, "
            "torch=torch.__version__, editable=[m for m in sys.modules if 'editable' in m])))")
    got = json.loads(_run([venv / "bin" / "python", "-c", code], cwd=tmp_path).stdout)
    root = str(venv.resolve())
    for name, path in got["files"].items():
        assert str(Path(path).resolve()).startswith(root + os.sep), f"{name} imported from {path}, not {root}"
    assert got["editable"] == [], "the development (editable) install is active in the fresh venv"
    assert got["torch"] == torch.__version__


def test_info(venv, tmp_path):
    out = _run([venv / "bin" / "sdecor", "info", "--json"], cwd=tmp_path)
    info = json.loads(out.stdout)
    assert info["torch"] == torch.__version__
    if not HAS_CXX:
        assert info["backends"]["cpu"]["native"] != "available", info
        return
    assert info["backends"]["cpu"]["native"] == "available", info
    ext = info["extension"]
    assert ext["torch"] == torch.__version__.split("+")[0] and ext["cuda"] == "none", ext


def test_demo_quick(venv, tmp_path):
    out_dir = tmp_path / "demo"
    out = _run([venv / "bin" / "python", "-m", "sdecor", "demo", "--quick", "--datasets", "shapes",
                "--no-progress", "--out", out_dir], cwd=tmp_path)
    assert "shapes" in out.stdout and "wall time" in out.stdout, out.stdout
    results = json.loads((out_dir / "results.json").read_text())
    assert set(results["summary"]) == {"shapes"}
    assert (out_dir / "report.md").is_file()
    assert list(out_dir.glob("*.png")), "no figures written"
    assert os.listdir(tmp_path) == ["demo"], "wrote outside --out"


def test_bench_quick(venv, tmp_path):
    out_dir = tmp_path / "bench"
    out = _run([venv / "bin" / "sdecor", "bench", "--quick", "--ops", "group_cov", "--out", out_dir],
               cwd=tmp_path)
    assert "group_cov" in out.stdout, out.stdout
    assert list(out_dir.glob("*.json")), f"no results in {out_dir}: {sorted(os.listdir(out_dir))}"
    assert os.listdir(tmp_path) == ["bench"], "wrote outside --out"
