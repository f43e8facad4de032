"""Optional dependencies: a command whose extra is not installed names the extra (sdecor._optional).

A missing package is simulated by putting None into sys.modules for it and its submodules: the import
system then raises ModuleNotFoundError for it, as when it is not installed; monkeypatch restores
the entries afterwards.
"""

import argparse
import sys
import types

import pytest

from sdecor import _optional, cli
from sdecor.cli import data, train
from sdecor._optional import MissingDependencyError, require


@pytest.fixture
def missing(monkeypatch):
    """missing("tqdm"): make ``import tqdm`` (and of any tqdm.* module) fail as if it were not installed."""

    def block(name):
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            monkeypatch.setitem(sys.modules, key, None)
        monkeypatch.setitem(sys.modules, name, None)

    return block


def test_require_returns_the_module():
    assert require("json", "demo", "a test") is sys.modules["json"]
    assert require("os.path", "demo", "a test") is sys.modules["os.path"]


def test_require_names_the_extra(missing):
    missing("tqdm")
    with pytest.raises(MissingDependencyError) as info:
        require("tqdm.auto", "demo", "the progress bar")
    msg = str(info.value)
    assert "the progress bar needs the package 'tqdm'" in msg
    assert "pip install 'sdecor[demo]'" in msg and "pip install tqdm" in msg
    assert isinstance(info.value, ImportError)            # `except ImportError` still catches it


def test_require_gives_the_pip_name_where_it_differs(missing):
    missing("sklearn")
    with pytest.raises(MissingDependencyError, match=r"sdecor\[demo\]'.*pip install scikit-learn"):
        require("sklearn.datasets", "demo", "the digits")
    assert _optional.PIP_NAMES["sklearn"] == "scikit-learn"


def test_require_bench_extra(missing):
    missing("matplotlib")
    with pytest.raises(MissingDependencyError, match=r"pip install 'sdecor\[bench\]'"):
        require("matplotlib", "bench", "the plots")


def test_require_reraises_a_missing_module_inside_an_installed_package(tmp_path, monkeypatch):
    # the package is installed but one of its own dependencies is not: that error is not ours to rename
    pkg = tmp_path / "sdecor_test_broken_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import sdecor_test_no_such_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        require("sdecor_test_broken_pkg", "demo", "a test")
    assert not isinstance(info.value, MissingDependencyError)
    assert info.value.name == "sdecor_test_no_such_module"


def test_demo_without_tqdm_names_the_extra_before_training(missing, tmp_path, capsys):
    missing("tqdm")
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--quick", "--datasets", "shapes", "--no-figures", "--no-progress",
                   "--out", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("sdecor demo: error: sdecor demo's progress bar needs the package 'tqdm'")
    assert "pip install 'sdecor[demo]'" in err and "Traceback" not in err
    assert not out.exists()                                # stopped before any work


def test_demo_without_matplotlib_names_the_extra_before_training(missing, tmp_path, capsys):
    missing("matplotlib")
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--quick", "--datasets", "shapes", "--no-progress", "--out", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "needs the package 'matplotlib'" in err and "--no-figures skips them" in err
    assert "pip install 'sdecor[demo]'" in err
    assert not out.exists()


def test_train_without_tqdm_names_the_extra(missing):
    missing("tqdm")
    cfg = train.TrainConfig(dataset="shapes", epochs=1)
    ds = data.Dataset("shapes", data.Split(None, None), data.Split(None, None), (), "unused")
    args = argparse.Namespace(no_progress=True, eval_samples=1)
    with pytest.raises(MissingDependencyError, match=r"sdecor train's progress bar .*sdecor\[demo\]"):
        train.train_and_report(cfg, ds, args)


def test_digits_without_scikit_learn_names_the_extra(missing, capsys):
    missing("sklearn")
    with pytest.raises(MissingDependencyError, match=r"digits dataset .*sdecor\[demo\]'.*scikit-learn"):
        data.load_digits()
    assert cli.main(["train", "--dataset", "digits", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sdecor train: error: ") and "pip install 'sdecor[demo]'" in err


def test_torchvision_dataset_without_torchvision_names_the_extra(missing, tmp_path):
    missing("torchvision")
    with pytest.raises(MissingDependencyError, match=r"mnist dataset .*pip install 'sdecor\[demo\]'"):
        data.load_torchvision("mnist", str(tmp_path))


def test_cli_lets_other_import_errors_through(monkeypatch):
    # only a missing extra becomes a one-line message; any other failure keeps its traceback
    def run(args):
        raise ImportError("something else")

    fake = types.SimpleNamespace(add_arguments=lambda p: None, run=run)
    monkeypatch.setitem(sys.modules, "sdecor_test_fake_command", fake)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("sdecor_test_fake_command", "a test command"))
    with pytest.raises(ImportError, match="something else"):
        cli.main(["fake"])
