"""Files the commands read: a file that is not what the command expects is one line naming the file
and what is wrong with it (exit code 2), never a traceback.

``sdecor bench --show FILE`` reads a results file; ``sdecor train --data-root DIR`` reads the
torchvision datasets from a folder. (No command reads a checkpoint: train and demo only write
model.pt.) Each gets empty, foreign, damaged and wrongly shaped files.
"""

import copy
import gzip
import json
from pathlib import Path

import pytest

from sdecor.cli import data, train

from test_cli_output import run_cli

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TIMING = RESULTS / "cpu-amd-epyc-2c.json"


# ---------------------------------------------------------------------------------------------------
# bench --show


def good_doc() -> dict:
    """A small valid results file: the curated CPU run's environment and its first records."""
    doc = json.loads(TIMING.read_text())
    statuses = {r["status"] for r in doc["results"]}
    keep = [next(r for r in doc["results"] if r["status"] == s) for s in sorted(statuses)]
    keep += [r for r in doc["results"] if r.get("targets")][:2] + [r for r in doc["results"] if r["impl"] == "floor"][:1]
    return dict(doc, results=keep)


def edit(change):
    """A copy of good_doc() changed in place by ``change(doc)``."""
    def make():
        doc = copy.deepcopy(good_doc())
        change(doc)
        return doc
    return make


def first_ok(doc):
    return next(r for r in doc["results"] if r["status"] == "ok")


def first_skipped(doc):
    return next(r for r in doc["results"] if r["status"] != "ok")


def first_target(doc):
    return next(r for r in doc["results"] if r.get("targets"))


# name -> (file contents: bytes, or a callable giving a JSON document; words the message holds)
SHOW_CASES = {
    "empty": (b"", "it is empty"),
    "blank": (b"  \n\t\n", "it is empty"),
    "text": (b"hello world\n", "it is not JSON (Expecting value at line 1, column 1)"),
    "binary": (bytes(range(256)), "not JSON"),
    "latin-1": ("{\"é\": 1}".encode("latin-1"), "not text (not UTF-8)"),
    "cut-short": (TIMING.read_bytes()[:5000], "it is not JSON"),
    "nested-deep": (b"[" * 100000, "nested too deeply"),
    "list": (b"[]", "it holds a list, not an object with 'environment' and 'results'"),
    "list-of-docs": (lambda: [good_doc()], "it holds a list"),
    "number": (b"42", "it holds a number"),
    "string": (b"\"results\"", "it holds a string"),
    "null": (b"null", "it holds null"),
    "empty-object": (b"{}", "it has no 'environment' (an empty object)"),
    "no-results": (edit(lambda d: d.pop("results")), "it has no 'results'"),
    "results-object": (edit(lambda d: d.update(results={"a": 1})), "'results' must be a list; got an object"),
    "environment-list": (edit(lambda d: d.update(environment=[])), "'environment' must be an object; got a list"),
    "env-missing-key": (edit(lambda d: d["environment"].pop("torch_threads")), "environment has no 'torch_threads'"),
    "env-threads-string": (edit(lambda d: d["environment"].update(torch_threads="2")),
                           "environment.torch_threads must be an integer >= 1; got '2'"),
    "env-threads-zero": (edit(lambda d: d["environment"].update(torch_threads=0)),
                         "environment.torch_threads must be an integer >= 1; got 0"),
    "env-device-null": (edit(lambda d: d["environment"].update(device_name=None)),
                        "environment.device_name must be a string; got None"),
    "env-allocations-list": (edit(lambda d: d["environment"].update(allocations=["x"])),
                             "environment.allocations must be an object with a 'text' string"),
    "record-list": (edit(lambda d: d["results"].append([1, 2])), "must be an object; got a list"),
    "record-no-op": (edit(lambda d: first_ok(d).pop("op")), "results[0] has no 'op'"),
    "record-op-number": (edit(lambda d: first_ok(d).update(op=3)), ".op must be a string; got 3"),
    "record-time-string": (edit(lambda d: first_ok(d).update(time_ms="fast")), ".time_ms must be a finite number > 0"),
    "record-time-zero": (edit(lambda d: first_ok(d).update(time_ms=0)), ".time_ms must be a finite number > 0; got 0"),
    "record-time-missing": (edit(lambda d: first_ok(d).pop("time_ms")), "has no 'time_ms'"),
    "record-reason-missing": (edit(lambda d: first_skipped(d).pop("reason")), "has no 'reason'"),
    "record-speedup-list": (edit(lambda d: first_ok(d).update(speedup=[1.0])), ".speedup must be an object of numbers"),
    "record-gbps-string": (edit(lambda d: first_ok(d).update(gbps="1")), ".gbps must be a number or null"),
    "record-checked-string": (edit(lambda d: first_ok(d).update(checked="yes")), ".checked must be true or false"),
    "target-not-object": (edit(lambda d: first_target(d).update(targets=[3])), ".targets[0] must be an object"),
    "target-bad-ratio": (edit(lambda d: first_target(d)["targets"][0].update(ratio="faster")),
                         ".ratio must be \"time\" or \"speedup\""),
    "target-bound-string": (edit(lambda d: first_target(d)["targets"][0].update(bound="2x")),
                            ".bound must be a number or null"),
    "foreign-distributed": (lambda: json.loads((RESULTS / "cpu-amd-epyc-2c-distributed.json").read_text()),
                            "it is the result of bench --distributed"),
    "foreign-static": (lambda: json.loads((RESULTS / "static-sm80-sm90.json").read_text()),
                       "it is the report of bench --static"),
    "foreign-demo": (b'{"meta": {}, "summary": {}, "runs": {}, "datasets": {}}', "results.json of sdecor demo"),
    "foreign-train": (b'{"config": {}, "history": [], "train_seconds": 1, "test": {}}', "metrics.json of sdecor train"),
}


def write_case(tmp_path, contents) -> Path:
    path = tmp_path / "results.json"
    if callable(contents):
        contents = json.dumps(contents()).encode()
    path.write_bytes(contents)
    return path


@pytest.mark.parametrize("case", sorted(SHOW_CASES))
def test_show_names_the_file_and_what_is_wrong(tmp_path, capsys, case):
    contents, words = SHOW_CASES[case]
    path = write_case(tmp_path, contents)
    code, out, err = run_cli(capsys, ["bench", "--show", str(path)])
    assert code == 2 and out == "" and len(err) == 1, err
    assert err[0].startswith(f"sdecor bench: error: --show {path}: not a results file: "), err
    assert words in err[0], err


@pytest.mark.parametrize("what", ["missing", "folder", "empty-path"])
def test_show_of_no_file(tmp_path, capsys, what):
    path = {"missing": str(tmp_path / "nope.json"), "folder": str(tmp_path), "empty-path": ""}[what]
    code, out, err = run_cli(capsys, ["bench", "--show", path])
    assert code == 2 and out == "" and len(err) == 1, err
    assert err[0].startswith(f"sdecor bench: error: --show {path}: not a results file: cannot read it: ")
    assert ("Is a directory" if what == "folder" else "No such file or directory") in err[0]


def test_show_of_good_files(tmp_path, capsys):
    code, out, _ = run_cli(capsys, ["bench", "--show", str(TIMING), "--markdown"])
    assert code == 0 and "### group_whiten" in out
    path = write_case(tmp_path, good_doc)
    code, out, err = run_cli(capsys, ["bench", "--show", str(path)])
    assert code == 0 and err == [] and all(f"== {r['op']} ==" in out for r in good_doc()["results"])
    empty = write_case(tmp_path, edit(lambda d: d.update(results=[])))           # a run that timed nothing
    assert run_cli(capsys, ["bench", "--show", str(empty)])[0] == 0


# ---------------------------------------------------------------------------------------------------
# train --data-root


def idx(dims, payload=None, code=0x08) -> bytes:
    """An idx file of unsigned bytes: magic, big-endian dims, the bytes."""
    n = 1
    for d in dims:
        n *= d
    body = bytes(payload) if payload is not None else bytes(i % 256 for i in range(n))
    return bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + body


def mnist_files(n_train=6, n_test=3, labels=None) -> dict:
    labels = labels or {}
    return {"train-images-idx3-ubyte": idx((n_train, 28, 28)),
            "train-labels-idx1-ubyte": idx((n_train,), labels.get("train", [i % 10 for i in range(n_train)])),
            "t10k-images-idx3-ubyte": idx((n_test, 28, 28)),
            "t10k-labels-idx1-ubyte": idx((n_test,), labels.get("test", [i % 10 for i in range(n_test)]))}


def make_root(tmp_path, sub, files) -> Path:
    root = tmp_path / "root"
    (root / sub).mkdir(parents=True)
    for name, contents in files.items():
        (root / sub / name).write_bytes(contents)
    return root


def mnist_with(**changes):
    def make():
        files = mnist_files()
        files.update(changes)
        return files
    return make


CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
               "batches.meta")

# name -> (dataset, subfolder, files, the file the message names, words)
ROOT_CASES = {
    "mnist-text": ("mnist", "MNIST/raw", lambda: {n: b"garbage " * 100 for n in mnist_files()},
                   "train-images-idx3-ubyte", "not an idx file of 3-D unsigned bytes"),
    "mnist-empty": ("mnist", "MNIST/raw", mnist_with(**{"train-images-idx3-ubyte": b""}),
                    "train-images-idx3-ubyte", "0 bytes, too short for an idx header"),
    "mnist-gzip": ("mnist", "MNIST/raw", mnist_with(**{"t10k-images-idx3-ubyte": gzip.compress(idx((3, 28, 28)))}),
                   "t10k-images-idx3-ubyte", "is it compressed?"),
    "mnist-cut-short": ("mnist", "MNIST/raw", mnist_with(**{"train-images-idx3-ubyte": idx((60000, 28, 28))[:5000]}),
                        "train-images-idx3-ubyte", "cut short"),
    "mnist-labels-as-images": ("mnist", "MNIST/raw", mnist_with(**{"train-labels-idx1-ubyte": idx((6, 28, 28))}),
                               "train-labels-idx1-ubyte", "not an idx file of 1-D unsigned bytes"),
    "mnist-label-count": ("mnist", "MNIST/raw", mnist_with(**{"t10k-labels-idx1-ubyte": idx((2,), [1, 2])}),
                          "t10k-labels-idx1-ubyte", "2 labels for the 3 images"),
    "mnist-label-range": ("mnist", "MNIST/raw", lambda: mnist_files(labels={"train": [1, 2, 3, 12, 0, 0]}),
                          "MNIST/raw", "label 12 is not a class index in [0, 10)"),
    "mnist-int-type": ("mnist", "MNIST/raw", mnist_with(**{"train-labels-idx1-ubyte": idx((6,), code=0x0C)[:12]}),
                       "train-labels-idx1-ubyte", "not an idx file"),
    "fashion-text": ("fashion-mnist", "FashionMNIST/raw", lambda: {n: b"\x00" for n in mnist_files()},
                     "train-images-idx3-ubyte", "too short for an idx header"),
    "cifar-garbage": ("cifar10", "cifar-10-batches-py", lambda: {n: b"garbage" for n in CIFAR_FILES},
                      "data_batch_1", "MD5 sum differs"),
    "cifar-empty": ("cifar10", "cifar-10-batches-py", lambda: {n: b"" for n in CIFAR_FILES},
                    "data_batch_1", "not the CIFAR-10 file"),
}


@pytest.fixture
def no_training(monkeypatch):
    monkeypatch.setattr(train, "train_model", lambda *a, **k: pytest.fail("trained on a bad dataset"))


@pytest.mark.parametrize("case", sorted(ROOT_CASES))
def test_data_root_with_bad_files_names_the_file(tmp_path, capsys, no_training, case):
    name, sub, files, culprit, words = ROOT_CASES[case]
    root = make_root(tmp_path, sub, files())
    code, out, err = run_cli(capsys, ["train", "--dataset", name, "--data-root", str(root), "--no-progress"])
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("sdecor train: error: --data-root: ") and str(root / sub) in err[0], err
    assert culprit in err[0] and words in err[0], err
    with pytest.raises(data.DatasetReadError):                     # the library-level error, for callers
        data.load_torchvision(name, str(root))


@pytest.mark.parametrize("what, words", [
    ("missing", "no such folder"),
    ("file", "is not a folder"),
    ("empty-folder", "not found under --data-root"),
    ("other-files", "not found under --data-root"),
    ("some-files", "not found under --data-root"),
])
def test_data_root_that_holds_no_dataset(tmp_path, capsys, no_training, what, words):
    root = tmp_path / "root"
    if what == "file":
        root.write_text("not a folder")
    elif what != "missing":
        root.mkdir()
    if what == "other-files":
        (root / "MNIST").mkdir()
        (root / "MNIST" / "notes.txt").write_text("x")
    if what == "some-files":                                          # one of the four files is missing
        make_root(tmp_path, "MNIST/raw", {k: v for k, v in mnist_files().items() if k != "t10k-labels-idx1-ubyte"})
    code, _, err = run_cli(capsys, ["train", "--dataset", "mnist", "--data-root", str(root), "--no-progress"])
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("sdecor train: error: ") and "--data-root" in err[0] and words in err[0], err
    assert str(root) in err[0]
    if what not in ("missing", "file"):
        assert "t10k-labels-idx1-ubyte" in err[0]                     # the files expected are listed


def test_a_good_small_mnist_folder_loads(tmp_path):
    root = make_root(tmp_path, "MNIST/raw", mnist_files(n_train=6, n_test=3))
    ds = data.load_torchvision("mnist", str(root))
    assert ds.train.x.shape == (6, 1, 28, 28) and ds.test.x.shape == (3, 1, 28, 28)
    assert ds.train.y.tolist() == [0, 1, 2, 3, 4, 5] and ds.num_classes == 10
