"""What setup.py packages: every package under python/ and sdecor_kernels, and the extras."""

import re
import runpy
from pathlib import Path

import pytest
import setuptools

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
    found = set()
    for top, base in (("sdecor", ROOT / "python"), ("sdecor_kernels", ROOT)):
        for path in (base / top).rglob("*.py"):
            if "__pycache__" not in path.parts:
                found.add(".".join(path.parent.relative_to(base).parts))
    return found


def test_every_folder_of_modules_is_a_package():
    # find_packages only finds folders with an __init__.py; one without would be left out of the wheel
    for name in _module_folders():
        base = ROOT / "python" if name.startswith("sdecor.") or name == "sdecor" else ROOT
        assert (base.joinpath(*name.split(".")) / "__init__.py").is_file(), f"{name} has no __init__.py"


def test_setup_packages_everything(setup_kwargs):
    packages = set(setup_kwargs["packages"])
    assert packages == _module_folders()
    assert {"sdecor", "sdecor.bench", "sdecor_kernels"} <= packages
    package_dir = setup_kwargs["package_dir"]
    assert package_dir[""] == "python" and package_dir["sdecor_kernels"] == "sdecor_kernels"


def test_extras(setup_kwargs):
    extras = {k: set(v) for k, v in setup_kwargs["extras_require"].items()}
    assert extras["demo"] == {"torchvision", "scikit-learn", "matplotlib", "tqdm"}
    assert extras["bench"] == {"matplotlib"}
    assert extras["all"] == extras["demo"] | extras["bench"]
    assert extras["test"] == extras["all"] | {"pytest"}
    assert set(setup_kwargs["install_requires"]) == {"torch>=2.4", "numpy"}

