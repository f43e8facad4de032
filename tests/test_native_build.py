"""The native extension sdecor._C: importable module, build_info, compiled architectures, build flags."""

import importlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from sdecor import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ARCH_LIST = "8.0;9.0"
needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"sdecor._C is not built: {_ext.error()}")


def _so_path():
    return importlib.import_module("sdecor._C").__file__


def _cuobjdump():
    """cuobjdump from the toolkit, PATH, or the copy bundled with Triton; None when there is none."""
    candidates = []
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    which = shutil.which("cuobjdump")
    if which:
        candidates.append(which)
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _arch_names(arch_list):
    """'8.0;9.0+PTX' -> {'80', '90'}; None when an entry is not of the X.Y form (e.g. 'Ampere')."""
    out = set()
    for item in re.split(r"[;\s,]+", arch_list.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", item)
        if m is None:
            return None
        out.add(m.group(1) + m.group(2) + m.group(3))
    return out


@needs_ext
def test_extension_is_a_python_module_inside_the_package():
    mod = importlib.import_module("sdecor._C")
    assert os.path.basename(mod.__file__).startswith("_C")
    assert os.path.dirname(os.path.realpath(mod.__file__)) == os.path.dirname(
        os.path.realpath(importlib.import_module("sdecor").__file__))
    assert hasattr(torch.ops.sdecor, "eigh_small") and hasattr(torch.ops.sdecor, "build_info")


@needs_ext
def test_build_info_fields():
    info = _ext.build_info()
    for key in ("cuda", "archs", "torch", "cxx"):
        assert key in info, f"build_info lacks {key!r}: {info}"
    assert info["torch"] == torch.__version__.split("+")[0], "built against another torch"
    assert re.fullmatch(r"(gcc|clang|msvc)-[\d.]+", info["cxx"]), info["cxx"]
    if info["cuda"] == "none":
        assert info["archs"] == "none"
    else:
        assert re.fullmatch(r"\d+\.\d+", info["cuda"]), info["cuda"]
        assert re.fullmatch(r"\d+[af]?(,\d+[af]?)*", info["archs"]), info["archs"]


@needs_ext
def test_build_info_matches_the_registered_kernels():
    has_cpu = torch._C._dispatch_has_kernel_for_dispatch_key("sdecor::eigh_small", "CPU")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("sdecor::eigh_small", "CUDA")
    has_meta = torch._C._dispatch_has_kernel_for_dispatch_key("sdecor::eigh_small", "Meta")
    assert has_cpu and has_meta
    assert has_cuda == _ext.has_cuda(), f"CUDA kernel registered: {has_cuda}; build_info: {_ext.build_info()}"


@needs_ext
def test_cuda_part_is_built_when_the_toolkit_is_there():
    # `make` exports CUDA_HOME when it finds a toolkit and builds with it; the same environment here
    # means the extension must hold its CUDA part (a silent CPU-only build would hide the GPU code).
    home = os.environ.get("CUDA_HOME", "")
    if not (home and os.path.exists(os.path.join(home, "bin", "nvcc"))):
        pytest.skip("CUDA_HOME is not set to a CUDA toolkit in this environment")
    if not torch.version.cuda:
        pytest.skip("torch is built without CUDA")
    if os.environ.get("USE_CUDA", "1").strip().lower() in ("0", "false", "no", "off", ""):
        pytest.skip("USE_CUDA=0")
    assert _ext.has_cuda(), (f"a CUDA toolkit is at CUDA_HOME={home} but sdecor._C has no CUDA part; rebuild "
                             "with `CUDA_HOME=... pip install --no-build-isolation -e .`")


@needs_ext
def test_cubins_for_every_built_architecture():
    if not _ext.has_cuda():
        pytest.skip("sdecor._C was built without its CUDA part (no toolkit at build time or USE_CUDA=0): "
                    "no device code to inspect")
    tool = _cuobjdump()
    assert tool is not None, "cuobjdump not found (CUDA_HOME/bin, PATH or Triton's bundled copy)"
    so = _so_path()
    listing = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    cubins = set(re.findall(r"\.sm_(\d+[af]?)\.cubin", listing))
    built = set(_ext.build_info()["archs"].split(","))
    assert cubins == built, f"cubins {sorted(cubins)} but build_info archs {sorted(built)}:\n{listing}"
    expected = _arch_names(os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST))
    if expected is None:
        pytest.skip("TORCH_CUDA_ARCH_LIST uses architecture names; only X.Y lists are compared")
    assert expected <= cubins, f"expected code for sm_{sorted(expected)}; the extension holds {listing}"
    # both dtypes x both layouts (V in shared memory / in global memory) of the eigensolver, per arch
    usage = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True,
                           check=True).stdout
    kernels = re.findall(r"Function (\S*eigh_small_fwd_kernelI([fd])Lb([01])E\S*):", usage)
    variants = {(dt, layout) for _, dt, layout in kernels}
    assert variants == {("f", "0"), ("f", "1"), ("d", "0"), ("d", "1")}, usage
    assert len(kernels) == 4 * len(cubins), usage


def _setup_py(env_overrides, *args):
    env = dict(os.environ, **env_overrides)
    return subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_setup_without_native_code():
    out = _setup_py({"USE_CPP": "0"}, "--name")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "sdecor"
    assert "USE_CPP=0: no native extension" in out.stderr


def test_setup_force_cuda_without_cuda_is_an_error():
    out = _setup_py({"USE_CUDA": "0", "FORCE_CUDA": "1"}, "--name")
    assert out.returncode != 0
    assert "FORCE_CUDA=1 but the CUDA part cannot be built: USE_CUDA=0" in out.stderr


def _build_team_check(tmp_path, extra_flags):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = str(tmp_path / "jacobi_team")
    src = os.path.join(ROOT, "csrc", "check", "jacobi_team.cc")
    out = subprocess.run([cxx, "-std=c++20", "-pthread", *extra_flags, src, "-o", exe], capture_output=True,
                         text=True, timeout=300)
    return exe, out


def test_jacobi_phases_with_a_team_of_threads(tmp_path):
    # The CUDA kernel's execution model on the CPU: items strided over threads, a barrier between
    # phases. Bitwise equality with the serial twin shows that every phase has disjoint writes.
    exe, out = _build_team_check(tmp_path, ["-O2"])
    assert out.returncode == 0, out.stderr
    run = subprocess.run([exe, "128"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "0 mismatch(es)" in run.stdout, run.stdout + run.stderr


def test_jacobi_phases_under_thread_sanitizer(tmp_path):
    exe, out = _build_team_check(tmp_path, ["-O1", "-g", "-fsanitize=thread"])
    if out.returncode != 0:
        pytest.skip(f"ThreadSanitizer is not available with this compiler: {out.stderr.strip()[-300:]}")
    run = subprocess.run([exe, "33"], capture_output=True, text=True, timeout=300)
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-3000:]
    assert run.returncode == 0 and "0 mismatch(es)" in run.stdout, run.stdout + run.stderr
