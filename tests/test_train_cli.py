"""The train command, its training loop, the plain objective and the small CNNs."""

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from sdecor import SaliencyDecor, cli
from sdecor.cli import data, train
from sdecor.cli.models import MODELS, build_model


def parse(*argv):
    parser = argparse.ArgumentParser(prog="sdecor train")
    train.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_registers_train():
    assert cli.COMMANDS["train"][0] == "sdecor.cli.train"
    args = cli.build_parser().parse_args(["train", "--dataset", "shapes", "--epochs", "3"])
    assert args.dataset == "shapes" and args.epochs == 3 and args._run is train.run


def tiny_digits(n_train=128, n_test=64):
    ds = data.load_digits()
    return ds._replace(train=data.Split(ds.train.x[:n_train], ds.train.y[:n_train]),
                       test=data.Split(ds.test.x[:n_test], ds.test.y[:n_test]))


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_train_missing_dataset_names_the_folder(tmp_path, capsys, name):
    args = parse("--dataset", name, "--data-root", str(tmp_path), "--no-progress")
    assert train.run(args) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "downloads are disabled" in err
    assert ("cifar-10-batches-py" if name == "cifar10" else "train-images-idx3-ubyte") in err


def test_train_rejects_bad_options_before_work(tmp_path, capsys):
    assert train.run(parse("--mask-ratio", "1.5", "--out", str(tmp_path / "o"))) == 2
    assert "mask_ratio must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert train.run(parse("--batch-size", "1")) == 2
    assert "batch_size must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--dataset", "imagenet")


@pytest.mark.parametrize("field, value, match", [
    ("epochs", 0, "epochs must be a positive int"),
    ("lambda_decor", -1.0, "lambda_decor must be a finite number >= 0"),
    ("lambda_consistency", float("nan"), "lambda_consistency must be a finite number"),
    ("fill", "baseline", "fill must be one of"),
    ("model", "vgg", "model must be one of"),
    ("norm", "layer", "norm must be one of"),
    ("num_channels", 0, "num_channels must be a positive int"),
])
def test_train_config_checks(field, value, match):
    cfg = train.TrainConfig(**{field: value})
    with pytest.raises(ValueError, match=match):
        cfg.check()


def test_norm_auto_follows_decorrelation():
    assert train.TrainConfig(lambda_decor=0.0).resolved_norm() == "batch"
    assert train.TrainConfig(lambda_decor=0.1).resolved_norm() == "whitening"
    assert train.TrainConfig(lambda_decor=0.1, norm="batch").resolved_norm() == "batch"


def test_train_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    args = parse("--dataset", "digits", "--epochs", "2", "--eval-samples", "32", "--no-progress", "--threads", "1",
                 "--lambda-consistency", "1", "--out", str(out))
    assert train.run(args) == 0
    text = capsys.readouterr().out
    assert "test accuracy" in text and "deletion AUC" in text
    res = json.loads((out / "metrics.json").read_text())
    assert res["config"]["lambda_consistency"] == 1.0 and len(res["history"]) == 2
    for key in ("accuracy", "gini", "entropy", "deletion_auc", "insertion_auc"):
        assert 0.0 <= res["test"][key] <= 1.0
    assert res["test"]["accuracy"] > 0.5                      # 2 epochs of digits: well above chance 0.1
    state = torch.load(out / "model.pt")
    model = build_model("tiny", 1, 10)
    model.load_state_dict(state["state_dict"])


def test_train_command_amp_fp16(tmp_path, capsys):
    """--amp fp16: the training steps under fp16 autocast with a GradScaler; recorded in metrics.json."""
    assert parse().amp == "off"
    out = tmp_path / "run"
    args = parse("--dataset", "digits", "--epochs", "1", "--eval-samples", "16", "--no-progress", "--threads", "1",
                 "--lambda-decor", "0.1", "--amp", "fp16", "--out", str(out))
    assert train.run(args) == 0
    text = capsys.readouterr().out
    assert "fp16 autocast" in text and "(whitening norm" in text and "test accuracy" in text
    res = json.loads((out / "metrics.json").read_text())
    assert res["config"]["amp"] == "fp16"
    assert all(math.isfinite(v) for v in res["history"][0].values())
    assert res["test"]["accuracy"] > 0.3                      # 1 epoch of digits: above chance 0.1


def test_amp_is_in_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "--amp {off,bf16,fp16}" in capsys.readouterr().out


def test_training_is_reproducible_and_learns():
    ds = tiny_digits(n_train=256)
    cfg = train.TrainConfig(dataset="digits", epochs=3, seed=4)
    a, b = train.train_model(cfg, ds), train.train_model(cfg, ds)
    assert a.history == b.history
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    assert a.history[-1]["ce"] < a.history[0]["ce"]
    assert a.history[-1]["consistency"] == 0.0 and a.history[-1]["decorrelation"] == 0.0


def test_training_runs_the_saliencydecor_objective():
    ds = tiny_digits()
    res = train.train_model(train.TrainConfig(dataset="digits", epochs=1, lambda_consistency=1.0), ds)
    h = res.history[-1]
    assert h["consistency"] > 0 and math.isclose(h["total"], h["ce"] + h["consistency"], rel_tol=1e-4)


def test_objective_without_consistency_is_ce_plus_decorrelation():
    torch.manual_seed(0)
    model = build_model("tiny", 1, 10, width=16)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    plain = SaliencyDecor(model, lambda_consistency=0.0, lambda_decor=0.0).loss(x, y)
    torch.testing.assert_close(plain.total, F.cross_entropy(model(x), y))
    assert plain.consistency == 0 and plain.saliency is None and plain.logits_masked is None
    from sdecor import decorrelation_loss

    feats = model.features(x)
    withd = SaliencyDecor(model, lambda_consistency=0.0, lambda_decor=0.5, num_channels=16).loss(x, y)
    torch.testing.assert_close(withd.decorrelation, decorrelation_loss(feats, 16))
    torch.testing.assert_close(withd.total, withd.ce + 0.5 * withd.decorrelation)


def test_evaluate_numbers_in_range():
    ds = data.load_shapes(n=120)
    res = train.train_model(train.TrainConfig(dataset="shapes", epochs=1), ds)
    ev = train.evaluate(res.model, ds.test, fractions=[0, 0.5, 1], max_samples=20, batch_size=8, keep_maps=4)
    assert ev["saliency_samples"] == 20 and ev["maps"].shape == (4, 24, 24)
    for key in ("accuracy", "gini", "entropy", "deletion_auc", "insertion_auc", "mask_mass_share"):
        assert 0.0 <= ev[key] <= 1.0, key
    assert all(len(c) == 3 for c in ev["curves"].values())
    # at fraction 1 deletion leaves an all-zero image: the same probability for every sample's class
    assert 0.0 <= ev["curves"]["deletion"][-1] <= 1.0


@pytest.mark.parametrize("norm", ["batch", "whitening"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_forward_backward(name, norm):
    model = build_model(name, 3, 5, norm=norm)
    x = torch.rand(4, 3, 24, 24)
    out = model(x)
    assert out.shape == (4, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert last.in_features % 16 == 0                        # the default decorrelation layer's groups
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("GroupWhitening" if norm == "whitening" else "BatchNorm2d") in kinds


def test_build_model_errors():
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("vgg", 3, 10)
    with pytest.raises(ValueError, match="norm must be one of"):
        build_model("tiny", 3, 10, norm="layer")
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        build_model("tiny", 3, 0)
