"""What setup.py packages: every package under python/ and sdecor_kernels, the extras, the build's torch."""

import re
import runpy
from pathlib import Path

import pytest
import setuptools

from conftest import source_modules

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_kwargs():
    """The arguments setup.py passes to setuptools.setup (no native build: USE_CPP=0)."""
    got = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(setuptools, "setup", lambda **kw: got.update(kw))
        mp.setenv("USE_CPP", "0")
        mp.chdir(ROOT)
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return got


def _module_folders():
    """Dotted names of the folders of the source tree that hold Python modules."""
    return {m.rsplit("/", 1)[0].replace("/", ".") for m in source_modules()}


def test_every_folder_of_modules_is_a_package():
    # find_packages only finds folders with an __init__.py; one without would be left out of the wheel
    for name in _module_folders():
        base = ROOT / "python" if name.startswith("sdecor.") or name == "sdecor" else ROOT
        assert (base.joinpath(*name.split(".")) / "__init__.py").is_file(), f"{name} has no __init__.py"


def test_setup_packages_everything(setup_kwargs):
    packages = set(setup_kwargs["packages"])
    assert packages == _module_folders()
    assert {"sdecor", "sdecor.cli", "sdecor.cli.bench", "sdecor_kernels"} <= packages
    package_dir = setup_kwargs["package_dir"]
    assert package_dir[""] == "python" and package_dir["sdecor_kernels"] == "sdecor_kernels"


def test_version_is_the_package_version(setup_kwargs):
    # setup.py states the version; the package reads its own from sdecor/_version.py
    from sdecor._version import __version__

    assert setup_kwargs["version"] == __version__


def test_extras(setup_kwargs):
    extras = {k: set(v) for k, v in setup_kwargs["extras_require"].items()}
    assert extras["demo"] == {"torchvision", "scikit-learn", "matplotlib", "tqdm"}
    assert extras["bench"] == {"matplotlib", "torchvision"}
    assert extras["all"] == extras["demo"] | extras["bench"]
    assert extras["test"] == extras["all"] | {"pytest"}
    assert set(setup_kwargs["install_requires"]) == {"torch>=2.4", "numpy"}


def test_build_torch_is_the_tested_torch():
    # an isolated build compiles the extension against build-system.requires' torch; it must be the
    # one requirements.txt installs and the tests run (see README, "Build against the torch you run")
    pyproject = (ROOT / "pyproject.toml").read_text()
    requires = re.search(r"^\[build-system\][^\[]*?^requires\s*=\s*\[([^\]]*)\]", pyproject, re.M | re.S)
    assert requires, "no build-system.requires in pyproject.toml"
    build_torch = [r for r in re.findall(r'"([^"]+)"', requires.group(1)) if re.match(r"torch\b", r)]
    pinned = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if re.match(r"torch\s*==", line)]
    assert len(pinned) == 1 and build_torch == [pinned[0].replace(" ", "")], (build_torch, pinned)
