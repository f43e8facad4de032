"""``sdecor train --distributed``: the per-rank batches, the checks made before any process group
exists, and a 2-process run under torchrun (gloo on the loopback interface)."""

import argparse
import functools
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from sdecor import cli
from sdecor.cli import data, train
from sdecor.cli.models import build_model

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def parse(*argv):
    parser = argparse.ArgumentParser(prog="sdecor train")
    train.add_arguments(parser)
    return parser.parse_args(list(argv))


def single_process_batches(n, batch_size, seed):
    """What one epoch of a single-process run trains on (batches of a randperm, a last one < 2 dropped)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [perm[s:s + batch_size] for s in range(0, n, batch_size) if len(perm[s:s + batch_size]) >= 2]


def rank_batches(n, batch_size, seed, world_size):
    return [list(train.batches(n, batch_size, torch.Generator().manual_seed(seed), r, world_size))
            for r in range(world_size)]


@pytest.mark.parametrize("n, batch_size", [(10, 4), (9, 4), (64, 64), (100, 7)])
def test_one_rank_batches_are_the_single_process_batches(n, batch_size):
    got = list(train.batches(n, batch_size, torch.Generator().manual_seed(3)))
    want = single_process_batches(n, batch_size, 3)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_batches_split_the_single_process_batches(world_size):
    n, batch_size = 60, 12                      # n a multiple of world_size: no padding
    single = single_process_batches(n, batch_size, 5)
    per_rank = rank_batches(n, batch_size, 5, world_size)
    assert all(len(b) == len(single) for b in per_rank)
    for k, step in enumerate(single):
        for r in range(world_size):
            assert torch.equal(per_rank[r][k], step[r::world_size])
        assert sorted(torch.cat([b[k] for b in per_rank]).tolist()) == sorted(step.tolist())


def test_rank_batches_pad_the_last_step_as_distributed_sampler():
    # n = 10, 3 ranks: the permutation is padded to 12 with its first 2 indices; the last global
    # batch is perm[6:10] + perm[0:2], 2 samples per rank
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    padded = torch.cat([perm, perm[:2]])
    per_rank = rank_batches(10, 6, 1, 3)
    for r in range(3):
        assert [b.tolist() for b in per_rank[r]] == [padded[0:6][r::3].tolist(), padded[6:12][r::3].tolist()]
    # n = 8, 3 ranks: padded to 9, the last step would hold 1 sample per rank: dropped on every rank
    per_rank = rank_batches(8, 6, 1, 3)
    assert [len(b) for b in per_rank] == [1, 1, 1] and all(len(b[0]) == 2 for b in per_rank)


def test_rank_batches_cover_an_epoch_of_digits():
    # the digits training split: 1348 samples, 21 steps of 64 and a last one of 4
    per_rank = rank_batches(1348, 64, 0, 2)
    assert [len(b) for b in per_rank] == [22, 22] and [len(b) for b in per_rank[0]] == [32] * 21 + [2]
    seen = torch.cat([torch.cat(b) for b in per_rank])
    assert sorted(seen.tolist()) == list(range(1348))


# ---------------------------------------------------------------------------------------------------
# checks before init_process_group: exit code 2, one line naming the option, nothing written


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def fake_torchrun(no_torchrun):
    """The environment torchrun gives rank 1 of 2 (nothing listens at the address: the checks below
    fail before any process group is made)."""
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "1")):
        no_torchrun.setenv(name, value)
    return no_torchrun


def fails_with(capsys, argv, *needles):
    assert train.run(parse(*argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sdecor train: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def test_distributed_without_torchrun_exits_2(no_torchrun, capsys, tmp_path):
    out = tmp_path / "o"
    err = fails_with(capsys, ["--distributed", "--lambda-decor", "0.1", "--out", str(out)],
                     "--distributed", "launch under torchrun", "RANK", "MASTER_PORT")
    assert "WORLD_SIZE" in err and not out.exists()
    no_torchrun.setenv("RANK", "0")                         # partly set: still names what is missing
    fails_with(capsys, ["--distributed", "--lambda-decor", "0.1"], "--distributed", "torchrun",
               "(WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing)")


def test_distributed_command_exit_code_without_torchrun(no_torchrun, capsys):
    # python -m sdecor exits with cli.main's return value
    assert cli.main(["train", "--distributed", "--lambda-decor", "0.1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "torchrun" in captured.err


@pytest.mark.parametrize("argv, needles", [
    (["--batch-size", "63"], ["--batch-size", "split evenly over the 2 ranks"]),
    (["--batch-size", "2"], ["--batch-size", "1 sample per rank", "at least 4"]),
], ids=["batch-not-divisible", "one-sample-per-rank"])
def test_distributed_option_checks(fake_torchrun, capsys, argv, needles):
    fails_with(capsys, ["--distributed", "--lambda-decor", "0.1", *argv], *needles)


@pytest.mark.parametrize("argv", [[], ["--norm", "batch"], ["--lambda-decor", "0.1", "--norm", "batch"]],
                         ids=["defaults", "norm-batch", "decor-with-batch-norm"])
def test_batch_norm_on_cpu_passes_the_checks(fake_torchrun, argv):
    """BatchNorm models train distributed on CPUs: sdecor.SyncBatchNormGloo synchronises them."""
    args = parse("--distributed", *argv)
    cfg = train.check_args(args)
    assert cfg.resolved_norm() == "batch" and train.check_distributed(args, cfg) == train.Distributed(1, 2, 1)
    train.check_distributed_config(cfg, train.Distributed(0, 4, 0))
    assert train.batchnorm_sync(cfg) == "gloo"
    assert train.batchnorm_sync(train.TrainConfig(norm="whitening")) is None


def test_sync_norm_layers_on_cpu_uses_sdecors_batchnorm():
    import sdecor

    model = train.sync_norm_layers(build_model("tiny", 1, 10, norm="batch"), "cpu")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(m) is sdecor.SyncBatchNormGloo for m in bns)
    # the state_dict is the single-process model's
    build_model("tiny", 1, 10, norm="batch").load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("fields, field, needle", [
    ({"device": "cuda:1"}, "device", "each rank uses cuda:LOCAL_RANK"),
    ({"device": "mps"}, "device", "cpu (gloo) or cuda (nccl)"),
    ({"batch_size": 30, "norm": "whitening"}, "batch_size", "multiple of 4"),
], ids=["cuda-index", "mps", "batch-not-divisible"])
def test_distributed_config_checks(fields, field, needle):
    # what train_model checks of a configuration before a distributed run (no device is touched)
    with pytest.raises(train.ConfigError, match=re.escape(needle)) as info:
        train.check_distributed_config(train.TrainConfig(**fields), train.Distributed(0, 4, 0))
    assert info.value.field == field


def test_distributed_env_values_are_checked(fake_torchrun, capsys):
    fake_torchrun.setenv("RANK", "two")
    fails_with(capsys, ["--distributed", "--lambda-decor", "0.1"], "--distributed", "RANK='two'")
    fake_torchrun.setenv("RANK", "2")
    fails_with(capsys, ["--distributed", "--lambda-decor", "0.1"], "--distributed", "RANK=2 is not below WORLD_SIZE=2")


def test_torchrun_without_distributed_is_an_error(fake_torchrun, capsys):
    fails_with(capsys, ["--lambda-decor", "0.1"], "--distributed", "WORLD_SIZE=2")


def test_save_all_ranks_needs_distributed_and_out(fake_torchrun, capsys, tmp_path):
    fails_with(capsys, ["--save-all-ranks", "--out", str(tmp_path)], "--save-all-ranks", "--distributed")
    fails_with(capsys, ["--distributed", "--lambda-decor", "0.1", "--save-all-ranks"], "--save-all-ranks", "--out")
    (tmp_path / "model-rank1.pt").mkdir()
    fails_with(capsys, ["--distributed", "--lambda-decor", "0.1", "--save-all-ranks", "--out", str(tmp_path)],
               "--out", "model-rank1.pt")


def test_decor_per_rank_needs_distributed_and_decorrelation(fake_torchrun, capsys):
    fails_with(capsys, ["--decor-per-rank", "--lambda-decor", "0.1"], "--decor-per-rank",
               "an option of --distributed runs")
    fails_with(capsys, ["--distributed", "--decor-per-rank"], "--decor-per-rank", "give --lambda-decor > 0")
    args = parse("--distributed", "--lambda-decor", "0.1", "--decor-per-rank")
    cfg = train.check_args(args)
    assert train.check_distributed(args, cfg) == train.Distributed(1, 2, 1)


def test_decor_mode():
    assert train.decor_mode(train.TrainConfig(lambda_decor=0.1)) == "global"
    assert train.decor_mode(train.TrainConfig(lambda_decor=0.1), per_rank=True) == "per-rank"
    assert train.decor_mode(train.TrainConfig(lambda_decor=0.0)) == "none"
    assert set(train.DECOR_MODES) == {"global", "per-rank", "none"}
    with pytest.raises(ValueError, match="decor_per_rank"):      # a single-process run has no ranks
        train.train_model(train.TrainConfig(lambda_decor=0.1), data.load("digits"), decor_per_rank=True)


# ---------------------------------------------------------------------------------------------------
# two processes under torchrun


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# An objective whose every step equals the single-process step on the same global batch (up to
# rounding): synchronised norm layers, the saliency pass and the clean and masked forwards inside one
# DDP forward, but mask ratio 0 (top-k masking is discontinuous: rounding-level differences in
# saliency could swap masked positions). The cases: whitening layers (SyncGroupWhitening); the
# default norm without decorrelation, BatchNorm (sdecor.SyncBatchNormGloo on CPU); the decorrelation
# loss (whitening layers) of the global batch, the default; and the decorrelation loss of each
# rank's share (--decor-per-rank), which is another objective than the single process's.
DIST_ARGS = ["--dataset", "digits", "--model", "tiny", "--lambda-consistency", "1",
             "--mask-ratio", "0", "--epochs", "1", "--eval-samples", "8", "--threads", "1", "--no-progress"]
CASES = {   # case: (its options, the norm layers, lambda_decor, metrics.json's distributed "decorrelation")
    "whitening": (["--norm", "whitening"], "whitening", 0.0, "none"),
    "batch": ([], "batch", 0.0, "none"),
    "decor": (["--lambda-decor", "0.1"], "whitening", 0.1, "global"),
    "decor-per-rank": (["--lambda-decor", "0.1", "--decor-per-rank"], "whitening", 0.1, "per-rank"),
}


@functools.lru_cache(maxsize=None)
def single_process_run(norm, lambda_decor):
    """The same steps in one process (one thread): the trained model's state_dict and its history."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train.train_model(train.TrainConfig(dataset="digits", model="tiny", norm=norm, lambda_consistency=1.0,
                                                  lambda_decor=lambda_decor, mask_ratio=0.0, epochs=1),
                                data.load("digits"))
    finally:
        torch.set_num_threads(threads)
    return res.model.state_dict(), res.history


@pytest.mark.parametrize("case", list(CASES))
def test_torchrun_two_ranks(tmp_path, case):
    case_args, norm, lambda_decor, decorrelation = CASES[case]
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "sdecor", "train", "--distributed", "--save-all-ranks", "--out", str(out), *DIST_ARGS, *case_args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr           # torchrun: 0 when every rank exits 0

    # only rank 0 prints and writes metrics.json and model.pt; --save-all-ranks adds rank 1's model
    assert proc.stdout.count("test accuracy") == 1 and proc.stdout.count("dataset digits") == 1, proc.stdout
    assert ("distributed: 2 ranks (gloo), global batch 64 = 32 samples per rank per step; "
            + train.DECOR_MODES[decorrelation]) in proc.stdout
    note = ("torch.nn.SyncBatchNorm does not run on CPU tensors: BatchNorm statistics synced over gloo by "
            "sdecor.SyncBatchNormGloo")
    assert proc.stdout.count(note) == (1 if norm == "batch" else 0), proc.stdout
    assert f"({norm} norm, group size" in proc.stdout
    assert sorted(os.listdir(out)) == ["metrics.json", "model-rank1.pt", "model.pt"]
    res = json.loads((out / "metrics.json").read_text())
    assert res["distributed"] == {"world_size": 2, "backend": "gloo", "batch_per_rank": 32,
                                  "decorrelation": decorrelation}
    # the features' decorrelation on the test split, from the saved model
    assert res["test"]["feature_decorrelation"].keys() == {"layer", "channels", "num_channels", "samples", "decov",
                                                           "corr"}
    assert res["test"]["feature_decorrelation"]["samples"] == 449

    # both ranks end with the same parameters and buffers, bit for bit
    state = torch.load(out / "model.pt")["state_dict"]
    state1 = torch.load(out / "model-rank1.pt")["state_dict"]
    assert state.keys() == state1.keys()
    assert [k for k in state if not torch.equal(state[k], state1[k])] == []
    assert int(state["features.0.1.num_batches_tracked"]) == 2 * 22     # 22 steps, clean + masked forward

    # model.pt loads into the single-process model, and the reported accuracy and feature
    # decorrelation are that model's
    model = build_model("tiny", 1, 10, norm=norm)
    model.load_state_dict(state)
    ds = data.load("digits")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        acc = train.accuracy(model, ds.test)
        assert res["test"]["feature_decorrelation"] == train.feature_decorrelation(model, ds.test, 16)
    finally:
        torch.set_num_threads(threads)
    assert res["test"]["accuracy"] == acc
    assert re.search(r"^test accuracy (\S+)$", proc.stdout, re.M).group(1) == f"{acc:.4f}"

    # the same steps in one process: the same model up to rounding, except with the decorrelation
    # loss of each rank's share, which trains another model
    single_state, single_history = single_process_run(norm, lambda_decor)
    assert res["history"][0].keys() == single_history[0].keys()
    history = torch.tensor(list(res["history"][0].values()))
    single_history = torch.tensor(list(single_history[0].values()))
    if decorrelation != "per-rank":
        for key, value in state.items():
            torch.testing.assert_close(value, single_state[key], msg=lambda m: f"{key}: {m}")
        torch.testing.assert_close(history, single_history)
    else:   # the global term's run agrees to about 2e-6 of each tensor's largest value; this one to 0.5
        largest = max((value - single_state[key]).abs().max() / single_state[key].abs().max()
                      for key, value in state.items() if value.is_floating_point())
        assert largest > 0.05, largest
        # the mean of the ranks' penalties of 32 samples each is not the global batch's penalty
        assert not torch.allclose(history, single_history, rtol=1e-3, atol=1e-3)
