"""SyncGroupWhitening: statistics over torch.distributed, checked against GroupWhitening on the
concatenated batch in one process; real worker processes on gloo (tests/dist_worker.py)."""

import datetime
import inspect

import pytest
import torch
import torch.distributed as dist
from torch import nn

import sdecor
from sdecor.nn import GroupWhitening, SyncGroupWhitening
from sdecor.ops import whiten_sync
from sdecor.testing import tol

from dist_worker import case_steps, init_layer, launch, layer_kwargs, layout, offsets, resnet_batches, resnet_model

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


def case(id, backend="torch", method="newton", dtype=F32, shape=(32, 3, 3), d=8, steps=2, seed=0, **kw):
    c = dict(id=id, backend=backend, method=method, dtype=dtype, shape=shape, d=d, steps=steps, seed=seed,
             ddp=True)
    if dtype == F64:
        c["param_dtype"] = F64
    c.update(kw)
    return c


# Each list runs in one launch of worker processes (their start-up dominates the cost).
CASES_2 = [
    case("torch-newton"),
    case("torch-zca", method="zca", seed=1),
    case("torch-newton-f64", dtype=F64, seed=2),
    case("torch-zca-f64", method="zca", dtype=F64, seed=3),
    case("torch-2d-linear", shape=(32,), d=16, seed=4),
    case("torch-5d", shape=(16, 2, 2, 3), d=4, method="zca", seed=5),
    case("torch-channels-last", shape=(16, 3, 4), d=8, channels_last=True, seed=6),
    case("torch-bf16", dtype=BF16, seed=7),
    case("torch-no-affine-cumulative", affine=False, momentum=None, ddp=False, steps=3, seed=8),
    case("torch-no-running-stats", track=False, method="zca", seed=9),
    case("torch-ranks-far-apart", spread=3e3, seed=10),                # between-rank variance >> within
    case("torch-huge-values", scale=1e25, method="zca", seed=11),      # statistics scaled by 2^e
    case("triton-newton", backend="triton", shape=(16, 2, 3), seed=12),
    case("triton-zca", backend="triton", method="zca", shape=(16, 2, 3), seed=13),
    case("triton-newton-d16", backend="triton", shape=(32, 3), d=16, spread=50.0, seed=14),
    # a smaller last group (24 channels at d=16: 16 + 8), padded statistics combined
    case("torch-smaller-last-group", shape=(24, 3), d=16, method="zca", last_group="smaller", seed=15),
    case("triton-smaller-last-group", backend="triton", shape=(24, 3), d=16, last_group="smaller", seed=16),
    case("native-newton", backend="native", seed=17),
    case("native-zca-f64", backend="native", method="zca", dtype=F64, seed=18),
    case("native-channels-last-bf16", backend="native", shape=(16, 3, 4), channels_last=True, dtype=BF16,
         seed=19),
    case("native-huge-values", backend="native", scale=1e25, seed=40),
    case("native-smaller-last-group", backend="native", shape=(24, 3), d=16, method="zca", last_group="smaller",
         seed=41),
]
CASES_3 = [
    case("torch-newton", seed=20),
    case("torch-zca", method="zca", seed=21),
    case("torch-newton-f64", dtype=F64, seed=22),
    case("torch-no-affine", affine=False, ddp=False, seed=23),
    case("triton-newton", backend="triton", shape=(16, 2, 3), seed=24),
    case("triton-zca", backend="triton", method="zca", shape=(16, 2, 3), seed=25),
    case("native-newton", backend="native", seed=26),
]
SIZES = {2: (3, 5), 3: (3, 5, 0)}
for _world, _cases in ((2, CASES_2), (3, CASES_3)):
    for _c in _cases:
        _c["sizes"] = SIZES[_world]


def reference(c):
    """GroupWhitening on the concatenated batch in this process, loss = sum over the ranks."""
    dev = torch.device(c.get("device", "cpu"))
    with sdecor.use_backend(c["backend"]):
        layer = init_layer(GroupWhitening(c["shape"][0], c["d"], **layer_kwargs(c)), c).to(dev)
        rec = {"y": [], "gx": [], "gw": [], "gb": []}
        for x_all, r_all in case_steps(c):
            x = layout(x_all.to(dev), c).clone().requires_grad_()
            y = layer(x)
            (y * r_all.to(dev)).sum().backward()
            rec["y"].append(y.detach().cpu())
            rec["gx"].append(x.grad.cpu())
            if layer.affine:
                rec["gw"].append(layer.weight.grad.cpu())
                rec["gb"].append(layer.bias.grad.cpu())
                layer.weight.grad = layer.bias.grad = None
        rec["state"] = {k: v.cpu() for k, v in layer.state_dict().items()}
    return rec


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """world size -> the ranks' results of the compare scenario (launched once per world size)."""
    cache = {}

    def get(world):
        if world not in cache:
            cases = CASES_2 if world == 2 else CASES_3
            cache[world] = launch(tmp_path_factory.mktemp(f"compare{world}"), "compare", world, cases)
        return cache[world]
    return get


def _check_case(ranks, c, world):
    ref = reference(c)
    tol_x = tol(c["dtype"])
    tol_p = tol(c.get("param_dtype", F32))
    G, d = -(-c["shape"][0] // c["d"]), c["d"]
    for step in range(c["steps"]):
        grads_w, grads_b = [], []
        for rank, (lo, hi) in enumerate(offsets(c["sizes"])):
            rec = ranks[rank][c["id"]]
            y, gx = rec["y"][step], rec["gx"][step]
            assert y.shape == ref["y"][step][lo:hi].shape and y.dtype == c["dtype"]
            torch.testing.assert_close(y, ref["y"][step][lo:hi], **tol_x, msg=f"y, rank {rank}, step {step}")
            torch.testing.assert_close(gx, ref["gx"][step][lo:hi], **tol_x,
                                       msg=f"input gradient, rank {rank}, step {step}")
            if c.get("channels_last"):
                assert rec["y_format_channels_last"]
            # one all_gather of the packed statistics in the forward, one all_reduce of (D, s) in the
            # backward, whatever the batch size (esize: fp32 statistics, fp64 for fp64 input)
            esize = 8 if c["dtype"] == F64 else 4
            gather = rec["fwd"][step]
            assert len(gather) == 1 and gather[0][0].startswith("all_gather"), gather
            assert gather[0][1:] == (whiten_sync.payload_numel(G, d), esize)     # sent by each rank
            assert rec["bwd"][step] == [("all_reduce", G * d * (d + 1), esize)]
            if rec["gw"]:
                grads_w.append(rec["gw"][step])
                grads_b.append(rec["gb"][step])
        if grads_w:
            if c["ddp"]:
                # after DDP's all-reduce every rank holds the mean over the ranks of the gradients
                for g in grads_w[1:]:
                    assert torch.equal(g, grads_w[0])
                gw, gb = grads_w[0] * world, grads_b[0] * world
            else:
                gw, gb = sum(grads_w), sum(grads_b)
            torch.testing.assert_close(gw, ref["gw"][step], **tol_p, msg=f"weight gradient, step {step}")
            torch.testing.assert_close(gb, ref["gb"][step], **tol_p, msg=f"bias gradient, step {step}")
    # running statistics: those of the concatenated batches, and bit for bit the same on every rank
    states = [ranks[r][c["id"]]["state"] for r in range(world)]
    assert states[0].keys() == ref["state"].keys()
    for key, value in ref["state"].items():
        for r in range(world):
            assert torch.equal(states[r][key], states[0][key]), f"{key} differs between rank 0 and rank {r}"
        if value.is_floating_point():
            torch.testing.assert_close(states[0][key], value, **tol_p, msg=key)
        else:
            assert torch.equal(states[0][key], value), key


@pytest.mark.slow
@pytest.mark.parametrize("c", CASES_2, ids=lambda c: c["id"])
def test_two_ranks_match_one_process(runs, c):
    _check_case(runs(2), c, 2)


@pytest.mark.slow
@pytest.mark.parametrize("c", CASES_3, ids=lambda c: c["id"])
def test_three_ranks_one_empty_match_one_process(runs, c):
    _check_case(runs(3), c, 3)


# ---------------------------------------------------------------------------------------------------
# failure paths, on two real processes


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("failures"), "failures", 2, {"hold": 8}, pg_timeout=5, timeout=120)


@pytest.mark.slow
def test_bad_input_fails_on_every_rank_before_any_collective(failures):
    for out in failures:
        assert out["bad_channels"][0] == "ValueError" and "16 channels" in out["bad_channels"][1]
        assert out["bad_dtype"][0] == "TypeError"
        assert out["forced_unavailable"][0] == "BackendUnavailableError"
        assert out["bad_device"][0] == "ValueError" and "is on meta but the input is on cpu" in out["bad_device"][1]
        assert out["calls_after_bad"] == []
        # the group is still in step: the next forward works
        assert out["good_after_bad"][0] == "ok"
        assert [name for name, *_ in out["calls_good"]] in (["all_gather_single"], ["all_gather_into_tensor"])


@pytest.mark.slow
def test_eval_mode_communicates_nothing_and_is_group_whitening(failures):
    for out in failures:
        y_sync, y_plain, calls = out["eval"]
        assert calls == []
        assert torch.equal(y_sync, y_plain)


@pytest.mark.slow
def test_double_backward_raises_on_every_rank(failures):
    for out in failures:
        kind, message = out["double_backward"]
        assert kind == "RuntimeError" and "create_graph=True" in message and "GroupWhitening" in message


@pytest.mark.slow
def test_fewer_than_two_samples_in_all_leave_running_stats(failures):
    assert failures[0]["tiny"][0] == "ok" and failures[0]["tiny"][1].shape == (1, 16, 1)
    assert torch.isfinite(failures[0]["tiny"][1]).all()
    assert failures[1]["tiny"][0] == "ok" and failures[1]["tiny"][1].shape == (0, 16, 1)
    assert failures[0]["tiny_state_same"] and failures[1]["tiny_state_same"]


@pytest.mark.slow
def test_a_failing_rank_leaves_the_others_waiting_until_the_timeout(failures):
    assert failures[0]["failing"][0] == "ValueError"
    kind, _ = failures[1]["failing"]
    assert kind != "ok"                                               # the collective gave up
    assert failures[1]["failing_seconds"] >= 4.0                      # pg_timeout = 5 s


# ---------------------------------------------------------------------------------------------------
# DDP-wrapped torchvision resnet18


# float64: with 5 samples of 16 channels per group in the last stage, the whitening is ill-conditioned
# and SGD steps amplify rounding differences (fp32: 4e-4 relative in the third loss)
RESNET = dict(seed=0, classes=10, d=16, method="newton", hw=32, sizes=(3, 2), steps=2, lr=0.05, dtype=F64)


@pytest.mark.slow
def test_ddp_resnet18_trains_identically_on_every_rank(tmp_path):
    pytest.importorskip("torchvision")
    ranks = launch(tmp_path, "resnet", 2, RESNET, timeout=400)
    assert ranks[0]["kinds"] == ["SyncGroupWhitening"]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][key], value), f"{key} differs between the ranks"
    # the same training in one process: GroupWhitening on the concatenated batches, loss = mean of
    # the ranks' losses (DDP averages the gradients)
    model = resnet_model(RESNET)
    opt = torch.optim.SGD(model.parameters(), lr=RESNET["lr"], momentum=0.9)
    bounds = offsets(RESNET["sizes"])
    losses = []
    for x, y in resnet_batches(RESNET):
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        per_rank = [nn.functional.cross_entropy(logits[lo:hi], y[lo:hi]) for lo, hi in bounds]
        (sum(per_rank) / len(per_rank)).backward()
        opt.step()
        losses.append(torch.stack(per_rank))
    for r in range(2):
        torch.testing.assert_close(ranks[r]["losses"], torch.stack(losses)[:, r], **tol(F64))
    state = model.state_dict()
    for key, value in ranks[0]["state"].items():
        if value.is_floating_point():
            torch.testing.assert_close(value, state[key], **tol(F64), msg=key)
        else:
            assert torch.equal(value, state[key]), key


# ---------------------------------------------------------------------------------------------------
# CUDA tensors: the same scenario over nccl (one GPU per rank), or over gloo on one GPU


def _cuda_cases():
    return [dict(c, device="cuda") for c in CASES_2 if c["dtype"] != BF16 or torch.cuda.is_bf16_supported()]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl across processes needs 2 CUDA devices")
def test_nccl_two_gpus_match_one_process(tmp_path):
    cases = _cuda_cases()
    ranks = launch(tmp_path, "compare", 2, cases, timeout=400, pg_backend="nccl")
    for c in cases:
        _check_case(ranks, c, 2)                                      # the reference on cuda:0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_two_ranks_on_one_gpu_match_one_process(tmp_path):
    cases = _cuda_cases()
    ranks = launch(tmp_path, "compare", 2, cases, timeout=400)
    for c in cases:
        _check_case(ranks, c, 2)


# ---------------------------------------------------------------------------------------------------
# in this process: no process group, world size 1, conversion, the combination of statistics


class _NoCollectives:
    """Makes every collective raise inside the block."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast")

    def __enter__(self):
        self.saved = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}

        def refuse(*args, **kwargs):
            raise AssertionError("a collective was called")
        for n in self.saved:
            setattr(dist, n, refuse)
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(dist, n, f)


def _train_steps(layer, xs):
    outs = []
    for x in xs:
        x = x.clone().requires_grad_()
        y = layer(x)
        (y * y.detach().sin()).sum().backward()
        outs.append((y.detach(), x.grad))
    return outs, {k: v.clone() for k, v in layer.state_dict().items()}, layer.weight.grad


def _assert_same_as_group_whitening(method):
    xs = [torch.randn(6, 16, 5) for _ in range(2)]
    sync = SyncGroupWhitening(16, 8, method=method)
    plain = GroupWhitening(16, 8, method=method)
    with torch.no_grad():
        sync.weight.uniform_(0.5, 1.5)
    plain.load_state_dict(sync.state_dict())
    with _NoCollectives():
        a = _train_steps(sync, xs)
        sync.eval()
        ya = sync(xs[0])
    b = _train_steps(plain, xs)
    plain.eval()
    yb = plain(xs[0])
    for (y1, g1), (y2, g2) in zip(a[0], b[0]):
        assert torch.equal(y1, y2) and torch.equal(g1, g2)
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert torch.equal(a[2], b[2]) and torch.equal(ya, yb)


@pytest.mark.parametrize("method", ["newton", "zca"])
def test_without_process_group_it_is_group_whitening(method):
    assert not dist.is_initialized()
    _assert_same_as_group_whitening(method)


def test_world_size_one_is_group_whitening(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        _assert_same_as_group_whitening("newton")
    finally:
        dist.destroy_process_group()


def test_same_arguments_buffers_and_state_dict_as_group_whitening():
    base = inspect.signature(GroupWhitening.__init__).parameters
    sync = inspect.signature(SyncGroupWhitening.__init__).parameters
    for name, p in base.items():
        assert name in sync and sync[name].default == p.default and sync[name].kind == p.kind, name
    assert sync["process_group"].default is None
    assert sdecor.SyncGroupWhitening is SyncGroupWhitening and "SyncGroupWhitening" in sdecor.__all__
    a, b = SyncGroupWhitening(32, 8, method="zca", momentum=None), GroupWhitening(32, 8, method="zca", momentum=None)
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    a.load_state_dict(b.state_dict())
    with pytest.raises(ValueError, match="num_channels"):
        SyncGroupWhitening(30, 8)


def _net(dtype=torch.float32):
    net = nn.Sequential(nn.Conv2d(3, 16, 3), GroupWhitening(16, 8), nn.ReLU(),
                        nn.Sequential(nn.Conv2d(16, 32, 1), GroupWhitening(32, 16, method="zca", T=7, eps=1e-3,
                                                                           momentum=None, affine=False)),
                        nn.Flatten(), nn.LazyLinear(4))
    net(torch.randn(2, 3, 6, 6))
    return net.to(dtype)


def test_convert_sync_whitening_keeps_parameters_buffers_and_modes(fake_world_of_two):
    net = _net(torch.float64)
    net[3][1].eval()
    before = {k: v for k, v in net.state_dict(keep_vars=True).items()}
    params = list(net.parameters())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    group = dist.new_group([0, 1])
    out = SyncGroupWhitening.convert_sync_whitening(net, process_group=group)
    assert out is net
    layers = [m for m in net.modules() if isinstance(m, GroupWhitening)]
    assert [type(m) for m in layers] == [SyncGroupWhitening, SyncGroupWhitening]
    assert all(m.process_group is group for m in layers)
    # the same tensors: an optimizer built before still updates the converted model
    assert all(a is b for a, b in zip(net.parameters(), params))
    after = net.state_dict(keep_vars=True)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert layers[0].training and not layers[1].training
    assert (layers[1].method, layers[1].T, layers[1].eps, layers[1].momentum, layers[1].affine) == ("zca", 7, 1e-3,
                                                                                                    None, False)
    assert layers[0].weight.dtype == torch.float64
    assert opt.param_groups[0]["params"][0] is params[0]
    # the way back
    back = SyncGroupWhitening.revert_sync_whitening(net)
    assert back is net
    assert [type(m) for m in net.modules() if isinstance(m, GroupWhitening)] == [GroupWhitening, GroupWhitening]
    again = net.state_dict(keep_vars=True)
    assert all(again[k] is before[k] for k in before)
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    net.eval()
    y1 = net(x)
    SyncGroupWhitening.convert_sync_whitening(net)
    net.eval()
    assert torch.equal(net(x), y1)


def test_convert_root_and_shared_layers():
    root = GroupWhitening(16, 8)
    new = SyncGroupWhitening.convert_sync_whitening(root)
    assert type(new) is SyncGroupWhitening and new.weight is root.weight
    assert type(SyncGroupWhitening.revert_sync_whitening(new)) is GroupWhitening
    shared = GroupWhitening(16, 8)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    SyncGroupWhitening.convert_sync_whitening(net)
    assert net[0] is net[2] and type(net[0]) is SyncGroupWhitening
    already = SyncGroupWhitening(16, 8)
    assert SyncGroupWhitening.convert_sync_whitening(already) is already
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        SyncGroupWhitening.convert_sync_whitening("net")


def _rank_stats(x, d):
    """Exact (fp64) local statistics in the layout of the torch passes: mean, cov (c = 1)."""
    G = x.shape[1] // d
    xg = x.to(F64).reshape(x.shape[0], G, d, -1).permute(1, 2, 0, 3).reshape(G, d, -1)
    mean = xg.mean(-1)
    xc = xg - mean[..., None]
    return mean, xc @ xc.transpose(-1, -2) / xg.shape[-1]


@pytest.mark.parametrize("sizes", [(4, 9, 0, 2), (0, 7), (5, 5, 5)], ids=str)
def test_combine_gives_the_statistics_of_the_union(sizes):
    d, C, L = 4, 8, 3
    x = torch.randn(sum(sizes), C, L, dtype=F64) * 3 + 2
    packed = []
    for lo, hi in offsets(sizes):
        if hi > lo:
            mean, cov = _rank_stats(x[lo:hi], d)
        else:
            mean, cov = torch.zeros(C // d, d, dtype=F64), torch.zeros(C // d, d, d, dtype=F64)
        packed.append(whiten_sync._pack((hi - lo) * L, mean, cov, torch.ones(C // d, dtype=F64)))
    assert packed[0].numel() == whiten_sync.payload_numel(C // d, d)
    mean, cov_s, c, n = whiten_sync.combine(torch.stack(packed), C // d, d)
    true_mean, true_cov = _rank_stats(x, d)
    assert n.item() == sum(sizes) * L
    torch.testing.assert_close(mean, true_mean, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(cov_s * (c * c)[:, None, None], true_cov, atol=1e-12, rtol=1e-12)


def test_combine_is_stable_where_sums_of_squares_cancel():
    # fp32, |mean| = 1e4 >> std = 1: sums of x and x^2 lose the variance to cancellation, the parallel
    # formula on centred moments keeps it
    d, C, L = 4, 4, 64
    sizes = (40, 25, 0)
    x = torch.randn(sum(sizes), C, L, dtype=F64) + 1e4
    packed, naive1, naive2 = [], 0, 0
    for lo, hi in offsets(sizes):
        xr = x[lo:hi].to(F32)
        if hi > lo:
            with sdecor.use_backend("torch"):
                st = whiten_sync.PASSES["torch"](xr, d).statistics()
                mean, cov, c = st.mean, st.cov, st.c
        else:
            mean, cov, c = torch.zeros(1, d), torch.zeros(1, d, d), torch.ones(1)
        packed.append(whiten_sync._pack((hi - lo) * L, mean, cov, c))
        xg = xr.reshape(hi - lo, 1, d, L).permute(1, 2, 0, 3).reshape(1, d, -1)
        naive1 = naive1 + xg.sum(-1)
        naive2 = naive2 + xg @ xg.transpose(-1, -2)
    mean, cov_s, c, n = whiten_sync.combine(torch.stack(packed), 1, d)
    true_mean, true_cov = _rank_stats(x, d)
    m = sum(sizes) * L
    err = ((cov_s * (c * c)[:, None, None]).to(F64) - true_cov).abs().max() / true_cov.abs().max()
    naive_cov = naive2 / m - (naive1 / m)[..., None] * (naive1 / m)[..., None, :]
    naive_err = (naive_cov.to(F64) - true_cov).abs().max() / true_cov.abs().max()
    assert err < 1e-5, err
    assert naive_err > 1e-2, naive_err                               # the comparison can tell them apart
    torch.testing.assert_close(mean.to(F64), true_mean, atol=2e-3, rtol=1e-6)
