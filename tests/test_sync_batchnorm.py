"""sdecor.SyncBatchNormGloo: BatchNorm on the global batch over torch.distributed, where torch's
SyncBatchNorm does not run (CPU tensors, gloo).

Two gloo worker processes on the loopback interface (tests/dist_worker.py, scenario "batchnorm")
train the layer on uneven shares of each batch, one of them empty in one case; every output, input
gradient, weight and bias gradient (summed over the ranks) and the running statistics (mean,
unbiased variance, num_batches_tracked) are compared with torch.nn.BatchNorm1d/2d/3d trained in
this process on the concatenated batch. Eval mode makes no collective and gives BatchNorm's output;
the state_dict loads strictly into torch's BatchNorm and back.
"""

import pytest
import torch
from torch import nn

import sdecor
from sdecor.sync_batchnorm import SyncBatchNormGloo

from dist_worker import case_steps, init_layer, launch, layout, offsets

F32, F64 = torch.float32, torch.float64
WORLD = 2


def case(id, shape=(6, 5, 4), sizes=(3, 5), dtype=F32, seed=0, steps=3, **kw):
    return dict(id=id, shape=shape, sizes=sizes, dtype=dtype, seed=seed, steps=steps, **kw)


CASES = [
    case("2d-f32-uneven"),
    case("2d-f64-momentum-none", dtype=F64, sizes=(5, 2), momentum=None, seed=1),
    case("1d-f32-flat", shape=(7,), sizes=(4, 3), seed=2),                      # (N, C): BatchNorm1d
    case("1d-f64-sequence", shape=(4, 6), sizes=(2, 3), dtype=F64, seed=3),       # (N, C, L): BatchNorm1d
    case("3d-f32", shape=(3, 2, 3, 4), sizes=(2, 1), seed=4),                    # BatchNorm3d
    case("2d-f32-empty-rank", sizes=(0, 6), seed=5),
    case("2d-f32-no-affine", sizes=(4, 4), affine=False, seed=6),
    case("2d-f32-no-running-stats", sizes=(2, 5), track=False, seed=7),
    case("2d-f32-channels-last", sizes=(3, 4), channels_last=True, seed=8),
    # ranks' means 1e4 apart (variance 1 within a rank): the combination across ranks carries it
    case("2d-f32-ranks-1e4-apart", spread=1e4, seed=9),
    case("2d-f64-ranks-1e6-apart", dtype=F64, spread=1e6, seed=10),
    # every mean near 1e4 / 1e6, variance about 1: a sum of squares would cancel the variance away
    case("2d-f32-means-1e4", offset=1e4, seed=11),
    case("2d-f64-means-1e6", dtype=F64, offset=1e6, seed=12),
]
# ranks that hold 1 value per channel together (one sample of (N, C)): one process raises there; the
# statistics are that value's, and the running statistics are kept
ONE_SAMPLE = case("1d-f32-one-value", shape=(6,), sizes=(1, 0), steps=1, seed=13)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("sync_bn"), "batchnorm", WORLD, CASES + [ONE_SAMPLE], timeout=240,
                  pg_timeout=60)


def plain_batchnorm(c: dict) -> nn.Module:
    """torch's BatchNorm of the case's input rank, initialised as the workers' layer."""
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 4: nn.BatchNorm3d}.get(len(c["shape"]), nn.BatchNorm2d)
    layer = cls(c["shape"][0], momentum=c.get("momentum", 0.1), affine=c.get("affine", True),
                track_running_stats=c.get("track", True))
    return init_layer(layer, c).to(c["dtype"])


def single_process(c: dict) -> dict:
    """The same steps in this process on the concatenated batch with torch's BatchNorm."""
    layer = plain_batchnorm(c)
    rec = {"y": [], "gx": [], "gw": [], "gb": []}
    for x_all, r_all in case_steps(c):
        x = layout(x_all, c).clone().requires_grad_()
        y = layer(x)
        (y * r_all).sum().backward()
        rec["y"].append(y.detach())
        rec["gx"].append(x.grad)
        if layer.affine:
            rec["gw"].append(layer.weight.grad.clone())
            rec["gb"].append(layer.bias.grad.clone())
            layer.weight.grad = layer.bias.grad = None
    rec["state"] = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    with torch.no_grad():
        rec["eval"] = layer(x_all)
    return rec


def tol(c: dict) -> dict:
    """Rounding of the input's dtype, times how far the means sit from 0 in standard deviations
    (both sides round x - mean in that dtype)."""
    eps = torch.finfo(c["dtype"]).eps
    far = 1.0 + c.get("offset", 0.0) + c.get("spread", 0.0)
    return dict(rtol=16 * eps, atol=16 * eps * far)


@pytest.mark.parametrize("c", CASES, ids=[c["id"] for c in CASES])
def test_equals_batchnorm_on_the_concatenated_batch(ranks, c):
    ref = single_process(c)
    got = [r[c["id"]] for r in ranks]
    bounds = offsets(c["sizes"])
    t = tol(c)
    for step in range(c["steps"]):
        for rank, (lo, hi) in enumerate(bounds):
            torch.testing.assert_close(got[rank]["y"][step], ref["y"][step][lo:hi], **t,
                                       msg=lambda m: f"y, rank {rank}, step {step}: {m}")
            torch.testing.assert_close(got[rank]["gx"][step], ref["gx"][step][lo:hi], **t,
                                       msg=lambda m: f"dx, rank {rank}, step {step}: {m}")
        if c.get("affine", True):
            # each rank's parameter gradients are its own share: summed over the ranks, the whole
            # batch's. They are sums of dy * xhat over the channel's m values, each xhat rounded as y
            # is: the error bound is that rounding times sum |dy| of the channel.
            r_all = case_steps(c)[step][1]
            dims = [0] + list(range(2, r_all.dim()))
            bound = t["atol"] * r_all.abs().sum(dims)
            for key in ("gw", "gb"):
                diff = (sum(g[key][step] for g in got) - ref[key][step]).abs()
                assert (diff <= bound + t["rtol"] * ref[key][step].abs()).all(), (key, step, diff, bound)
        # one all_gather of 2C + 1 float64 numbers forward, one all_reduce of 2C backward, per rank
        C = c["shape"][0]
        for g in got:
            assert g["fwd"][step] == [("all_gather", 2 * C + 1, 8)]
            assert g["bwd"][step] == [("all_reduce", 2 * C, 8)]
    state = ref["state"]
    for rank in range(WORLD):
        assert got[rank]["state"].keys() == state.keys()
        for key, value in state.items():
            if key == "num_batches_tracked":
                assert torch.equal(got[rank]["state"][key], value), (key, got[rank]["state"][key], value)
            else:
                # the running variance is the unbiased one, as BatchNorm's
                torch.testing.assert_close(got[rank]["state"][key], value, **t,
                                           msg=lambda m: f"{key}, rank {rank}: {m}")
    for key in state:                                                  # the ranks agree bit for bit
        assert torch.equal(got[0]["state"][key], got[1]["state"][key]), key
    if c.get("channels_last"):
        assert all(g["y_channels_last"] for g in got if g["y"][0].numel())


@pytest.mark.parametrize("c", CASES, ids=[c["id"] for c in CASES])
def test_eval_is_batchnorm_and_makes_no_collective(ranks, c):
    ref = single_process(c)
    for rank in range(WORLD):
        got = ranks[rank][c["id"]]
        assert got["eval_calls"] == []
        # torch's BatchNorm with the worker's buffers gives the same output, bit for bit
        plain = plain_batchnorm(c)
        plain.load_state_dict(got["state"], strict=True)
        plain.eval()
        x_all = case_steps(c)[-1][0]
        with torch.no_grad():
            assert torch.equal(got["eval"], plain(x_all))
        # and torch's own, trained in one process: running statistics as close as the training's
        t = tol(c)
        torch.testing.assert_close(got["eval"], ref["eval"], rtol=t["atol"], atol=t["atol"])


def test_fewer_than_two_samples_on_all_ranks_keep_the_running_statistics(ranks):
    c = ONE_SAMPLE
    fresh = plain_batchnorm(c).state_dict()
    for rank in range(WORLD):
        got = ranks[rank][c["id"]]
        for key, value in fresh.items():
            assert torch.equal(got["state"][key], value), key
    # the one sample is its own mean: the output is the bias, up to the rounding of x * scale + shift
    # with scale = weight / sqrt(eps), about 300 (as BatchNorm forms it)
    (y,) = ranks[0][c["id"]]["y"]
    bias = init_layer(plain_batchnorm(c), c).bias.detach()
    torch.testing.assert_close(y, bias.view(1, -1).expand_as(y), rtol=0, atol=1e-4)
    assert ranks[1][c["id"]]["y"][0].shape[0] == 0


def test_bad_input_is_refused_before_any_collective(ranks):
    for r in ranks:
        assert r["bad_input_calls"] == [] and r["bad_input_state_same"]
        assert r["bad_input"]["channels"][0] == "ValueError" and "expected 4 channels" in r["bad_input"]["channels"][1]
        assert r["bad_input"]["dims"][0] == "ValueError" and "2D to 5D" in r["bad_input"]["dims"][1]
        assert r["bad_input"]["dtype"][0] == "TypeError" and "floating-point" in r["bad_input"]["dtype"][1]


# ---------------------------------------------------------------------------------------------------
# one process: BatchNorm exactly, conversion, state_dict


@pytest.mark.parametrize("cls, shape", [(nn.BatchNorm1d, (4, 3)), (nn.BatchNorm1d, (4, 3, 5)),
                                        (nn.BatchNorm2d, (4, 3, 5, 2)), (nn.BatchNorm3d, (4, 3, 2, 2, 3))],
                         ids=["1d-flat", "1d-seq", "2d", "3d"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_a_process_group_it_is_batchnorm(cls, shape, momentum):
    g = torch.Generator().manual_seed(0)
    ours, plain = SyncBatchNormGloo(3, momentum=momentum), cls(3, momentum=momentum)
    for layer in (ours, plain):
        init_layer(layer, dict(seed=3))
    for _ in range(3):
        x = torch.randn(shape, generator=g) * 2 + 1
        assert torch.equal(ours(x), plain(x))
    for key, value in plain.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    ours.eval(), plain.eval()
    assert torch.equal(ours(x), plain(x))
    with pytest.raises(ValueError, match="expected at least 2D input"):
        ours(torch.randn(3))


def test_state_dict_is_batchnorms():
    ours = SyncBatchNormGloo(8)
    ours(torch.randn(4, 8, 3, 3) + 2)
    plain = nn.BatchNorm2d(8)
    assert plain.state_dict().keys() == ours.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape and ours.state_dict()[key].dtype == value.dtype
    plain.load_state_dict(ours.state_dict(), strict=True)
    assert int(plain.num_batches_tracked) == 1
    SyncBatchNormGloo(8).load_state_dict(plain.state_dict(), strict=True)


def test_convert_shares_the_tensors_and_keeps_the_options():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, eps=1e-3, momentum=None), nn.ReLU(),
                        nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False, track_running_stats=False)),
                        nn.SyncBatchNorm(5))
    net[1].eval()
    before = {k: v for k, v in net.state_dict().items()}
    params = [id(p) for p in net.parameters()]
    out = SyncBatchNormGloo.convert_sync_batchnorm(net, process_group=None)
    assert out is net
    kinds = [type(m) for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [SyncBatchNormGloo] * 3
    assert [id(p) for p in net.parameters()] == params
    for key, value in net.state_dict().items():
        assert value is before[key] or value.data_ptr() == before[key].data_ptr(), key
    assert net[1].eps == 1e-3 and net[1].momentum is None and not net[1].training
    assert not net[3][1].affine and not net[3][1].track_running_stats and net[3][1].running_mean is None
    assert SyncBatchNormGloo.convert_sync_batchnorm(net) is net                  # nothing left to convert
    single = SyncBatchNormGloo.convert_sync_batchnorm(nn.BatchNorm3d(2))
    assert type(single) is SyncBatchNormGloo and single.num_features == 2


def test_exported_from_sdecor():
    assert sdecor.SyncBatchNormGloo is SyncBatchNormGloo and "SyncBatchNormGloo" in sdecor.__all__
    assert "SyncBatchNormGloo" in sdecor.__doc__
