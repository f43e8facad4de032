"""Build and package sdecor.

Packages ``sdecor`` with all its subpackages (found under ``python/``) and ``sdecor_kernels``, and
builds the optional extension ``sdecor._C`` from ``csrc/``:

* the C++ part whenever a C++ compiler is present (``USE_CPP=0`` turns all native code off);
* the CUDA part when ``torch.version.cuda`` is set and a CUDA toolkit is found (``CUDA_HOME``, else
  ``/usr/local/cuda``); ``USE_CUDA=0`` turns it off, ``FORCE_CUDA=1`` makes a missing toolkit an
  error instead of a skip;
* ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default ``"8.0;9.0"``), ``MAX_JOBS`` the
  number of parallel compile jobs.

A machine with no compiler still gets a working install: the torch backend needs no native code.
The GPU is never probed here; only the toolkit and torch's build decide.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def _flag(name, default="1"):
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


def _log(msg):
    print(f"sdecor setup: {msg}", file=sys.stderr)


def _find_cxx():
    cxx = os.environ.get("CXX") or "c++"
    return shutil.which(cxx) or shutil.which("g++") or shutil.which("clang++")


def _find_cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = os.path.join(home, "bin", "nvcc")
    return home if os.path.exists(nvcc) else None


def _extensions():
    """Return (ext_modules, cmdclass); both empty when no native build is possible or wanted."""
    if not _flag("USE_CPP"):
        _log("USE_CPP=0: no native extension, torch backend only")
        return [], {}
    if _find_cxx() is None:
        _log("no C++ compiler found: no native extension, torch backend only")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not importable at build time: no native extension")
        return [], {}

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if not cpp_sources:
        return [], {}

    want_cuda = _flag("USE_CUDA")
    force_cuda = _flag("FORCE_CUDA", "0")
    cuda_home = _find_cuda_home() if want_cuda else None
    with_cuda = bool(want_cuda and torch.version.cuda and cuda_home and cuda_sources)
    if force_cuda and not with_cuda:
        why = ("USE_CUDA=0" if not want_cuda else
               "torch was built without CUDA" if not torch.version.cuda else
               "no CUDA toolkit (set CUDA_HOME)" if not cuda_home else "no .cu sources")
        raise RuntimeError(f"FORCE_CUDA=1 but the CUDA part cannot be built: {why}")

    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    extra = {"cxx": ["-O3", "-std=c++20"]}
    link = []
    # at::parallel_for is inline OpenMP in torch's headers when torch uses OpenMP: without -fopenmp
    # the CPU kernels would run on one thread. The runtime is torch's own libgomp (same soname).
    if torch.backends.openmp.is_available() and not sys.platform.startswith(("darwin", "win")):
        extra["cxx"].append("-fopenmp")
        link.append("-fopenmp")
    sources = list(cpp_sources)
    if with_cuda:
        # torch's cpp_extension reads CUDA_HOME and the arch list from the environment.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        cpp_extension.CUDA_HOME = cuda_home
        sources += cuda_sources
        define_macros.append(("SDECOR_WITH_CUDA", "1"))
        extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        ext_cls = cpp_extension.CUDAExtension
        _log(f"building C++ and CUDA parts (CUDA_HOME={cuda_home}, arch list {arch_list})")
    else:
        ext_cls = cpp_extension.CppExtension
        _log("building the C++ part only"
             + ("" if want_cuda else " (USE_CUDA=0)"))

    ext = ext_cls(
        name="sdecor._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=link,
        py_limited_api=False,
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=bool(shutil.which("ninja")))
    return [ext], {"build_ext": build_ext}


def _packages():
    """(packages, package_dir): every package under python/ (sdecor and its subpackages) and
    sdecor_kernels at the top. Found, not listed, so a new subpackage cannot be left out of the
    wheel; a folder of modules without an __init__.py is not a package (tests/test_packaging.py
    checks that there is none)."""
    packages = find_packages(where=os.path.join(ROOT, "python"), include=["sdecor", "sdecor.*"])
    kernels = find_packages(where=ROOT, include=["sdecor_kernels", "sdecor_kernels.*"])
    package_dir = {"": "python"}
    package_dir.update({name: name.replace(".", "/") for name in kernels})
    return packages + kernels, package_dir


PACKAGES, PACKAGE_DIR = _packages()

# Optional dependencies, by what needs them; a command whose extra is missing names it
# (sdecor._optional.require). The core (the ops, the nn modules, `sdecor info`) needs only torch and numpy.
EXTRAS = {
    # `sdecor demo` / `sdecor train`: scikit-learn's digits, progress bars, figures; the
    # torchvision datasets of `sdecor train` (mnist, fashion-mnist, cifar10)
    "demo": ["torchvision", "scikit-learn", "matplotlib", "tqdm"],
    # `sdecor bench`: the per-op plots; the ResNet-18 of the training-step suite (--suite steps-cpu)
    "bench": ["matplotlib", "torchvision"],
}
EXTRAS["all"] = sorted(set(EXTRAS["demo"]) | set(EXTRAS["bench"]))
EXTRAS["test"] = ["pytest"] + EXTRAS["all"]

ext_modules, cmdclass = _extensions()

setup(
    name="sdecor",
    version="0.1.0",
    description="Fused kernels for group-wise ZCA whitening, decorrelation and saliency-guided training",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir=PACKAGE_DIR,
    packages=PACKAGES,
    install_requires=["torch>=2.4", "numpy"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["sdecor = sdecor.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
