"""Bad input is refused before any work and changes nothing.

The CLI: every option of ``sdecor train`` and ``sdecor demo`` is checked before data is read or a
folder is made; a bad one exits with code 2 and one line naming the option. The objective and the
metrics: labels of a wrong dtype or out of range raise an error naming y, and SaliencyDecor.loss
leaves every buffer of the model (and its generator) as it was when it raises.
"""

import copy

import pytest
import torch
from torch import nn

from sdecor import _checks, cli, metrics
from sdecor.cli import demo, train
from sdecor.masking import saliency
from sdecor.cli.models import MODELS, build_model, check_group_size, layer_channels
from sdecor.objective import SaliencyDecor

from test_cli_output import no_work  # noqa: F401  (a fixture: fails a command that reads data, trains or times)
from test_objective import _cnn

NO_CUDA = not torch.cuda.is_available()


def run_cli(capsys, argv):
    """(exit code, stderr lines) of ``sdecor <argv>``; argparse's own errors exit through SystemExit."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


# ---------------------------------------------------------------------------------------------------
# sdecor train


# (argv, the option the error names); the dataset is embedded, so only a bad option can stop the run
TRAIN_CASES = [
    (["--device", "bogus"], "--device"),
    (["--device", "meta"], "--device"),
    (["--device", "cuda:99"], "--device"),
    pytest.param(["--device", "cuda"], "--device", marks=pytest.mark.skipif(not NO_CUDA, reason="a GPU is here")),
    (["--width", "0"], "--width"),
    (["--width", "-1"], "--width"),
    (["--lambda-decor", "0.1", "--num-channels", "7"], "--num-channels"),
    (["--lambda-decor", "0.1", "--norm", "batch", "--num-channels", "7"], "--num-channels"),
    (["--norm", "whitening", "--model", "resnet8", "--num-channels", "3"], "--num-channels"),
    (["--num-channels", "0"], "--num-channels"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "1"], "--batch-size"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lambda-consistency", "-1"], "--lambda-consistency"),
    (["--lambda-decor", "inf"], "--lambda-decor"),
    (["--mask-ratio", "1.5"], "--mask-ratio"),
    (["--mask-ratio", "-0.1"], "--mask-ratio"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2 ** 64)], "--seed"),
    (["--threads", "0"], "--threads"),
    (["--eval-samples", "0"], "--eval-samples"),
    (["--data-root", "{tmp}/no-such-folder"], "--data-root"),
    (["--dataset", "mnist"], "--data-root"),
    (["--dataset", "imagenet"], "--dataset"),            # argparse's choices
    (["--model", "vgg"], "--model"),
    (["--norm", "layer"], "--norm"),
    (["--fill", "baseline"], "--fill"),
    (["--width", "wide"], "--width"),                    # argparse's type
    (["--amp", "fp8"], "--amp"),
    (["--amp", "on"], "--amp"),
    (["--amp", "BF16"], "--amp"),
]


def _assert_bad_option(capsys, no_work, command, argv, option, out, ours):
    """exit 2, the last stderr line names the option (ours: the only line), no folder, no work."""
    code, err = run_cli(capsys, [command, *argv, "--out", str(out),
                                 *(["--quick"] if command == "demo" else []), "--no-progress"])
    assert code == 2
    assert err and err[-1].startswith(f"sdecor {command}: error:") and option in err[-1], err
    if ours:
        assert len(err) == 1 and err[0].startswith(f"sdecor {command}: error: {option}"), err   # ours: one line
    assert not out.exists() and no_work == []


@pytest.mark.parametrize("argv, option", TRAIN_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_train_bad_option(tmp_path, capsys, no_work, argv, option):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    ours = option not in ("--dataset", "--model", "--norm", "--fill") and argv != ["--width", "wide"]
    _assert_bad_option(capsys, no_work, "train", argv, option, tmp_path / "out", ours)


@pytest.mark.parametrize("make, words", [
    (lambda tmp: str(tmp / "file" / "x"), "not a folder"),                # a path under a regular file
    (lambda tmp: str(tmp / "file"), "not a folder"),                      # the path is a regular file
    (lambda tmp: "", "folder path"),
    (lambda tmp: "/etc/passwd/x", "not a folder"),
], ids=["under-file", "file", "empty", "under-etc-passwd"])
def test_train_bad_out_before_any_work(tmp_path, capsys, no_work, make, words):
    (tmp_path / "file").write_text("keep")
    code, err = run_cli(capsys, ["train", "--out", make(tmp_path), "--no-progress"])
    assert code == 2 and len(err) == 1 and err[0].startswith("sdecor train: error: --out") and words in err[0], err
    assert no_work == [] and (tmp_path / "file").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_train_out_with_a_folder_where_a_result_goes(tmp_path, capsys, no_work):
    (tmp_path / "model.pt").mkdir()
    code, err = run_cli(capsys, ["train", "--out", str(tmp_path), "--no-progress"])
    assert code == 2 and len(err) == 1 and "--out" in err[0] and "model.pt" in err[0], err
    assert no_work == [] and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_out_dir_check_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    assert train.check_out_dir(str(target), train.OUTPUT_FILES) == str(target)
    assert not (tmp_path / "a").exists()


def test_train_good_options_pass_the_checks(tmp_path):
    parser = cli.build_parser(["train"])
    args = parser.parse_args(["train", "--out", str(tmp_path / "new" / "run"), "--lambda-decor", "0.1",
                              "--width", "8", "--num-channels", "8", "--seed", "3", "--amp", "fp16"])
    cfg = train.check_args(args)
    assert cfg.width == 8 and cfg.resolved_norm() == "whitening" and cfg.amp == "fp16"
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("field, value", [
    ("width", 0), ("width", 2.5), ("seed", -1), ("seed", 2 ** 63), ("device", "bogus"), ("device", "meta"),
    ("num_channels", 7), ("amp", "fp32"), ("amp", None),
])
def test_train_config_names_the_field(field, value):
    cfg = train.TrainConfig(lambda_decor=0.1, **{field: value})
    with pytest.raises(train.ConfigError, match=field) as info:
        cfg.check()
    assert info.value.field == field and isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------------------------
# sdecor demo


DEMO_CASES = [
    (["--device", "bogus"], "--device"),
    (["--device", "cuda:99"], "--device"),
    pytest.param(["--device", "cuda"], "--device", marks=pytest.mark.skipif(not NO_CUDA, reason="a GPU is here")),
    (["--seeds", "0"], "--seeds"),
    (["--eval-samples", "0"], "--eval-samples"),
    (["--threads", "0"], "--threads"),
    (["--datasets", "digits,cifar10"], "--datasets"),
    (["--datasets", ","], "--datasets"),
    (["--seeds", "x"], "--seeds"),                        # argparse's type
    (["--amp", "fp8"], "--amp"),
]


@pytest.mark.parametrize("argv, option", DEMO_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_demo_bad_option(tmp_path, capsys, no_work, argv, option):
    _assert_bad_option(capsys, no_work, "demo", argv, option, tmp_path / "out", argv != ["--seeds", "x"])


@pytest.mark.parametrize("where", ["under-file", "file", "empty", "figure-is-a-folder"])
def test_demo_bad_out_before_any_work(tmp_path, capsys, no_work, where):
    (tmp_path / "file").write_text("keep")
    out = {"under-file": tmp_path / "file" / "x", "file": tmp_path / "file", "empty": "",
           "figure-is-a-folder": tmp_path}[where]
    if where == "figure-is-a-folder":
        (tmp_path / "masking_curves.png").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_cli(capsys, ["demo", "--out", str(out), "--quick", "--no-progress"])
    assert code == 2 and len(err) == 1 and err[0].startswith("sdecor demo: error: --out"), err
    assert no_work == [] and sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "file").read_text() == "keep"


def test_demo_figures_off_does_not_check_figure_files(tmp_path):
    assert "masking_curves.png" not in demo.output_files(["digits"], figures=False)
    assert demo.output_files(["digits"], figures=True)[-2:] == ["saliency_digits.png", "masking_curves.png"]


# ---------------------------------------------------------------------------------------------------
# the models' channel layout (what --num-channels is checked against)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("width", [None, 8, 12])
def test_layer_channels_match_the_built_model(name, width):
    model = build_model(name, 3, 10, norm="batch", width=width)
    norms, features = layer_channels(name, width)
    assert sorted(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)) == sorted(norms)
    assert model.classifier.in_features == features


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("norm", ["batch", "whitening"])
@pytest.mark.parametrize("decorrelate", [False, True])
def test_group_size_check_agrees_with_construction(name, norm, decorrelate):
    for d in (1, 3, 5, 7, 8, 16, 24, 48, 64, 100):
        try:
            model = build_model(name, 3, 10, norm=norm, num_channels=d)
            SaliencyDecor(model, num_channels=d, lambda_decor=0.1 if decorrelate else 0.0)
            builds = True
        except ValueError:
            builds = False
        try:
            check_group_size(name, norm, d, decorrelate=decorrelate)
            passes = True
        except ValueError as err:
            assert "num_channels" in str(err)
            passes = False
        assert builds == passes, (name, norm, decorrelate, d)


def test_width_checked_by_build_model():
    for width in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="width must be a positive int"):
            build_model("tiny", 3, 10, width=width)


# ---------------------------------------------------------------------------------------------------
# labels and the objective's state


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 4


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


RANGE = r"y must hold class indices in \[0, 4\).*; got "
BAD_LABELS = [
    ("out of range", lambda y: torch.full_like(y, 4), ValueError, RANGE + "4"),
    ("negative", lambda y: y - 1, ValueError, RANGE + "-1"),
    ("float", lambda y: y.float(), TypeError, "y must be an integer tensor"),
    ("bool", lambda y: y > 0, TypeError, "y must be an integer tensor"),
    ("shape", lambda y: y[:-1], ValueError, "y must be a tensor of N=8 class indices"),
    ("list", lambda y: y.tolist(), TypeError, "y must be an integer tensor"),
]


@pytest.mark.parametrize("case, make, error, match", BAD_LABELS, ids=[c[0] for c in BAD_LABELS])
@pytest.mark.parametrize("lambda_consistency", [0.0, 1.0])
def test_objective_bad_labels_change_nothing(case, make, error, match, lambda_consistency):
    model = _cnn().train()
    gen = torch.Generator().manual_seed(5)
    obj = SaliencyDecor(model, num_channels=8, lambda_consistency=lambda_consistency, lambda_decor=0.1,
                        generator=gen)
    x, y = _data()
    before, gen_state = _state(model), gen.get_state()
    with pytest.raises(error, match=match):
        obj.loss(x, make(y))
    _assert_state(model, before)
    assert torch.equal(gen.get_state(), gen_state)
    assert all(p.grad is None for p in model.parameters()) and all(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("lambda_consistency", [0.0, 1.0])
def test_objective_bad_decor_channels_change_no_buffer(lambda_consistency):
    """The decor layer's input (16 channels) is known only in the forward, after the BatchNorm before
    it has updated its statistics; the error puts them back."""
    model = _cnn().train()
    gen = torch.Generator().manual_seed(5)
    obj = SaliencyDecor(model, num_channels=32, decor_layers=["3"], lambda_consistency=lambda_consistency,
                        generator=gen)
    x, y = _data()
    before, gen_state = _state(model), gen.get_state()
    with pytest.raises(ValueError, match="decor layer '3'.*C=16 channels, not divisible by num_channels=32"):
        obj.loss(x, y)
    _assert_state(model, before)
    assert torch.equal(gen.get_state(), gen_state)
    assert all(not m._forward_pre_hooks for m in model.modules())
    model(x)                                                           # the check reads buffers that move
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])


def test_objective_bad_decor_channels_whitening_model():
    """Every GroupWhitening buffer before the decorrelated layer is put back too."""
    model = build_model("tiny", 3, 4, norm="whitening", num_channels=8).train()
    obj = SaliencyDecor(model, num_channels=5, decor_layers=["classifier"], lambda_consistency=1.0,
                        generator=torch.Generator().manual_seed(0))
    x, y = _data()
    before = _state(model)
    with pytest.raises(ValueError, match="not divisible by num_channels=5"):
        obj.loss(x, y)
    _assert_state(model, before)


def test_objective_takes_any_integer_labels():
    model = _cnn().train()
    x, y = _data()
    twin = copy.deepcopy(model)
    ref = SaliencyDecor(model, num_channels=8, generator=torch.Generator().manual_seed(1)).loss(x, y)
    got = SaliencyDecor(twin, num_channels=8, generator=torch.Generator().manual_seed(1)).loss(x, y.int())
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case, make, error, match", BAD_LABELS, ids=[c[0] for c in BAD_LABELS])
def test_saliency_bad_labels(case, make, error, match):
    model = _cnn().train()
    x, y = _data()
    before = _state(model)
    with pytest.raises(error, match=match):
        saliency(model, x, make(y))
    _assert_state(model, before)
    assert all(m.training for m in model.modules())


def _curves(model, x, y, sal):
    fr = [0.0, 0.5, 1.0]
    return {"masking_curve": lambda: metrics.masking_curve(model, x, y, sal, fr),
            "insertion_auc": lambda: metrics.insertion_auc(model, x, y, sal, fr),
            "deletion_auc": lambda: metrics.deletion_auc(model, x, y, sal, fr),
            "accuracy_under_masking": lambda: metrics.accuracy_under_masking(model, x, y, sal, fr)}


@pytest.mark.parametrize("case, make, error, match", BAD_LABELS, ids=[c[0] for c in BAD_LABELS])
def test_metrics_bad_labels(case, make, error, match):
    model = _cnn().eval()
    x, y = _data()
    sal = torch.rand(8, 8, 8, generator=torch.Generator().manual_seed(0))
    for name, call in _curves(model, x, make(y), sal).items():
        with pytest.raises(error, match=match):
            call()


def test_metrics_take_any_integer_labels():
    model = _cnn().eval()
    x, y = _data()
    sal = torch.rand(8, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = {k: f() for k, f in _curves(model, x, y, sal).items()}
    got = {k: f() for k, f in _curves(model, x, y.to(torch.uint8), sal).items()}
    for k in ref:
        for a, b in zip(ref[k] if isinstance(ref[k], tuple) else [ref[k]],
                        got[k] if isinstance(got[k], tuple) else [got[k]]):
            torch.testing.assert_close(a, b)


def test_label_range_is_checked_on_cpu_only():
    """Off the CPU the check would be a host sync: it is skipped (a meta tensor cannot be read)."""
    _checks.check_label_range(torch.empty(3, dtype=torch.int64, device="meta"), 2)
    with pytest.raises(ValueError, match=r"labels must hold class indices in \[0, 2\).*; got 2"):
        _checks.check_label_range(torch.tensor([0, 2]), 2, name="labels")
    _checks.check_label_range(torch.empty(0, dtype=torch.int64), 2)
