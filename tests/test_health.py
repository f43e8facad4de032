"""sdecor.whitening_report against its float64 reference (sdecor.health_reference).

Every comparison takes each whitening layer's input and its training matrix W from the model itself:
a copy of the model runs the same forward with forward pre-hooks keeping each layer's input and every
whitening layer at momentum 1, so that its running matrix after the forward is the W that layer
computed (the report restores torch's random state, so that the copy's dropout draws what the
report's forward drew). The report computes W on its own; the reference gets the layer's W, so the
comparison also checks that the report's W is the layer's. Inputs with a chosen covariance spectrum per group give
condition numbers from 1e2 to 1e8; groups with fewer samples than channels, the smaller last group,
newton (several T) and zca, every backend on the CPU, the model's state, JSON, worst() and bad input.
"""

import copy
import json
import math

import pytest
import torch
from torch import nn

import sdecor
from sdecor import health_reference as hr
from sdecor.nn import GroupWhitening, GroupWhiteningAct, SyncGroupWhitening, SyncGroupWhiteningAct

F32, F64 = torch.float32, torch.float64
FIELDS = hr.FIELDS
U64 = 2.0 ** -53


# ---------------------------------------------------------------------------------------------------
# shared pieces of the tests


def _whitening_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GroupWhitening)]


def _layer_inputs_and_matrices(model, args):
    """{name: (input, W)} of every whitening layer in one training-mode forward of a copy of model:
    the input by a forward pre-hook, W as the layer's running matrix after one batch at momentum 1."""
    twin = copy.deepcopy(model)
    seen = {}
    for name, layer in _whitening_layers(twin):
        assert layer.track_running_stats
        # the running matrix holds W exactly where it has W's dtype: float32, or float64 for float64 input
        want = F64 if args[0].dtype == F64 and not torch.is_autocast_enabled("cpu") else F32
        assert layer.running_wm.dtype == want
        layer.momentum = 1.0
        layer.register_forward_pre_hook(lambda l, i, name=name: seen.__setitem__(name, i[0].detach().clone()))
    twin.train()
    with torch.no_grad():
        twin(*args)
    return {name: (seen[name], layer.running_wm.clone()) for name, layer in _whitening_layers(twin) if name in seen}


def _reference(model, args, tol=1e-3, matrices=None):
    """{name: the reference's fields} for every whitening layer of model that runs on args."""
    matrices = _layer_inputs_and_matrices(model, args) if matrices is None else matrices
    layers = dict(_whitening_layers(model))
    out = {}
    for name, (x, w) in matrices.items():
        layer = layers[name]
        out[name] = hr.layer_health(x, layer.num_channels, method=layer.method, eps=layer.eps, T=layer.T,
                                    last_group=layer.last_group, w=w,
                                    running_wm=layer.running_wm if layer.track_running_stats else None, tol=tol)
    return out


def _check_record(record, expected, rtol=1e-6):
    """The record equals the reference: eps_share and t_needed exactly, the other fields to ``rtol``
    relative, the error fields (whitening_error, running_error, newton_residual) also to an absolute
    floor of 64 u d cond(S_g) per group (u = 2^-53): their float64 evaluation carries about u cond(S)
    of rounding (W S W^T with W ~ S^(-1/2) amplifies the rounding of S by cond(S)), so that a value at
    that level, e.g. the error of an exact whitening, is noise in both."""
    assert record.num_groups == expected["num_groups"]
    assert record.group_sizes == tuple(expected["group_sizes"])
    sizes = torch.tensor(record.group_sizes, dtype=F64)
    floor = 64 * U64 * sizes * expected["condition"]
    for field in FIELDS:
        got, want = getattr(record, field), expected[field]
        assert got.dtype == F64 and got.shape == (record.num_groups,), field
        if field in ("eps_share", "t_needed"):
            assert torch.equal(got, want), (record.name, field, got, want)
            continue
        atol = floor if field in ("whitening_error", "running_error", "newton_residual") else 0.0
        close = (got - want).abs() <= rtol * want.abs() + atol
        bad = ~(close | (got.isnan() & want.isnan()))                 # NaN only where the reference has NaN
        assert not bool(bad.any()), (f"{record.name} {field}: got {got.tolist()}, reference {want.tolist()}, "
                                     f"rtol {rtol}, floor {floor.tolist()}")


def _check_report(report, model, args, tol=1e-3, rtol=1e-6):
    expected = _reference(model, args, tol)
    assert [r.name for r in report] == list(expected)
    for record in report:
        _check_record(record, expected[record.name], rtol)


def _spectral_batch(N, spectra, offset=0.5):
    """(N, C) float64 samples whose groups have exactly (to rounding) the covariance Q_g diag(l_g) Q_g^T,
    l_g = spectra[g], Q_g a random rotation; N > d_g."""
    parts = []
    for lam in spectra:
        k = lam.numel()
        z = torch.randn(N, k, dtype=F64)
        z = z - z.mean(0)
        chol = torch.linalg.cholesky(z.T @ z / N)                     # z^T z / N = L L^T
        z = torch.linalg.solve_triangular(chol, z.T, upper=False).T   # now z^T z / N = I
        q, _ = torch.linalg.qr(torch.randn(k, k, dtype=F64))
        parts.append(z @ torch.diag(lam.sqrt()) @ q.T + offset)
    return torch.cat(parts, 1)


def _spectra(sizes, cond):
    """Per group g: eigenvalues spread log-evenly from 2^g down to 2^g / cond."""
    return [torch.logspace(0, -math.log10(cond), k, dtype=F64) * (2.0 ** g) for g, k in enumerate(sizes)]


class Net(nn.Module):
    """conv - whitening - relu - conv - dropout - whitening(Act) - pool - linear."""

    def __init__(self, c1=40, c2=24, d1=16, d2=8, method="newton", T=5, last_group="smaller", c0=3, **kw):
        super().__init__()
        self.conv1 = nn.Conv2d(c0, c1, 3, padding=1)
        self.wh1 = GroupWhitening(c1, d1, method=method, T=T, last_group=last_group, **kw)
        self.conv2 = nn.Conv2d(c1, c2, 3)
        self.drop = nn.Dropout(0.3)
        self.wh2 = GroupWhiteningAct(c2, d2, method=method, T=T, last_group=last_group, act=nn.ReLU(), **kw)
        self.fc = nn.Linear(c2, 10)

    def forward(self, x):
        x = self.conv2(torch.relu(self.wh1(self.conv1(x))))
        x = self.wh2(self.drop(x))
        return self.fc(x.mean((2, 3)))


def _trained(model, steps=2, shape=(8, 3, 6, 6), dtype=F32):
    """model after a few training forwards (running statistics away from their initial values)."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(shape, dtype=dtype))
    return model


def _available(backend):
    return sdecor.info()["backends"]["cpu"][backend] == "available"


# ---------------------------------------------------------------------------------------------------
# the fields against the reference


RANDOM_CASES = [(method, T, dtype, "smaller") for method, T in (("newton", 1), ("newton", 5), ("newton", 12),
                                                                  ("zca", 5)) for dtype in (F32, F64)]
RANDOM_CASES += [("newton", 5, F32, "even"), ("zca", 5, F64, "even")]


def _random_id(case):
    method, T, dtype, last_group = case
    return f"{method}{'-T%d' % T if method == 'newton' else ''}-{'fp32' if dtype == F32 else 'fp64'}-{last_group}"


@pytest.mark.parametrize("method,T,dtype,last_group", RANDOM_CASES, ids=list(map(_random_id, RANDOM_CASES)))
def test_random_model_matches_reference(method, T, dtype, last_group):
    c1 = 32 if last_group == "even" else 40                            # 40 = 16 + 16 + 8
    model = _trained(Net(c1=c1, method=method, T=T, last_group=last_group).to(dtype), dtype=dtype)
    x = torch.randn(6, 3, 7, 7, dtype=dtype)
    report = sdecor.whitening_report(model, x)
    assert len(report) == 2 and [r.name for r in report] == ["wh1", "wh2"]
    assert report[0].group_sizes == ((16, 16) if last_group == "even" else (16, 16, 8))
    assert all(float(r.condition.max()) < 1e3 for r in report)        # well conditioned
    _check_report(report, model, (x,), rtol=1e-6)
    if method == "zca":
        assert all(torch.equal(r.newton_residual, torch.zeros_like(r.newton_residual)) for r in report)
        bound = 1e-4 if dtype == F32 else 1e-11                       # exact up to the dtype's rounding
        assert all(float(r.whitening_error.max()) < bound for r in report)


# float64 layers at every condition number; float32 ones at 1e8, where the layer's float32 statistics
# no longer resolve the spectrum (T = 40 Newton-Schulz steps then give a NaN W in a group, and the
# report says so: NaN where the reference has NaN)
ILL_CASES = [(cond, method, T, F64) for cond in (1e2, 1e4, 1e6, 1e8)
             for method, T in (("newton", 5), ("newton", 40), ("zca", 5))]
ILL_CASES += [(1e8, method, T, F32) for method, T in (("newton", 5), ("newton", 40), ("zca", 5))]


def _ill_id(case):
    cond, method, T, dtype = case
    return f"cond{cond:.0e}-{method}{'-T%d' % T if method == 'newton' else ''}-{'fp32' if dtype == F32 else 'fp64'}"


@pytest.mark.parametrize("cond,method,T,dtype", ILL_CASES, ids=list(map(_ill_id, ILL_CASES)))
def test_ill_conditioned_groups_match_reference(cond, method, T, dtype):
    sizes = (8, 8, 5)                                                  # C = 21 at d = 8: a last group of 5
    eps = 1e-3 / cond                                                  # cond(S) ~ cond
    layer = GroupWhitening(sum(sizes), 8, method=method, T=T, eps=eps, last_group="smaller", dtype=dtype)
    model = nn.Sequential(layer)
    x = _spectral_batch(64, _spectra(sizes, cond)).to(dtype)
    report = sdecor.whitening_report(model, x)
    (record,) = report
    assert record.name == "0" and record.group_sizes == sizes
    if dtype == F64:                                                   # the designed spectrum
        top = 2.0 ** torch.arange(3, dtype=F64)
        torch.testing.assert_close(record.condition, (top + eps) / (top / cond + eps), rtol=1e-6, atol=0)
    rtol = 1e-6 if cond <= 1e2 else 1e-3
    _check_report(report, model, (x,), rtol=rtol)


def test_rank_deficient_groups_match_reference():
    # m = 5 samples per channel for groups of 16 (and a last group of 8): rank 4 covariances
    model = nn.Sequential(GroupWhitening(40, 16, last_group="smaller", T=7, dtype=F64),
                          GroupWhitening(40, 16, last_group="smaller", method="zca", dtype=F64))
    x = torch.randn(5, 40, dtype=F64) * 3 + 1
    report = sdecor.whitening_report(model, x)
    _check_report(report, model, (x,))
    for record in report:
        sizes = torch.tensor(record.group_sizes, dtype=F64)
        torch.testing.assert_close(record.eps_share, (sizes - 4) / sizes, rtol=0, atol=0)
        assert bool((record.effective_rank <= 4 + 1e-9).all()) and bool((record.effective_rank > 1).all())


def test_smaller_last_group_is_measured_on_its_own_channels():
    """The last group's fields are those of a layer of its r channels alone (r x r matrices, not the
    zero-padded d x d ones): the same report as for a layer with d = r on those channels."""
    x = torch.randn(12, 21, dtype=F64) * torch.linspace(0.5, 3, 21, dtype=F64) + 1
    whole = sdecor.whitening_report(nn.Sequential(GroupWhitening(21, 8, last_group="smaller", method="zca")), x)
    last = sdecor.whitening_report(nn.Sequential(GroupWhitening(5, 5, method="zca")), x[:, 16:])
    assert whole[0].group_sizes == (8, 8, 5)
    for field in ("condition", "effective_rank", "eps_share", "t_needed", "running_error"):
        torch.testing.assert_close(getattr(whole[0], field)[-1:], getattr(last[0], field), rtol=1e-12, atol=0)
    assert float(whole[0].effective_rank[-1]) <= 5


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
@pytest.mark.parametrize("method", ["newton", "zca"])
def test_every_backend_on_cpu(backend, method):
    if not _available(backend):
        pytest.skip(f"backend {backend!r} does not run here: {sdecor.info()['backends']['cpu'][backend]}")
    # two layers, groups of 8 and 4 (smaller last group: 20 = 8 + 8 + 4)
    model = _trained(nn.Sequential(nn.Conv2d(3, 20, 1), GroupWhitening(20, 8, method=method, T=6, last_group="smaller"),
                                   nn.ReLU(), nn.Conv2d(20, 16, 1), GroupWhitening(16, 8, method=method, T=3)),
                     shape=(4, 3, 3, 3))
    x = torch.randn(4, 3, 3, 3)
    with sdecor.use_backend(backend):
        report = sdecor.whitening_report(model, x)
        matrices = _layer_inputs_and_matrices(model, (x,))            # the layers' W on this backend
    expected = _reference(model, (x,), matrices=matrices)
    for record in report:
        _check_record(record, expected[record.name], rtol=1e-6)


def test_w_where_the_running_matrix_cannot_hold_it():
    """float64 input to a layer with float32 buffers, and a layer without running statistics: W is
    then computed apart from the layer; it must still be the layer's, here recovered from the
    layer's own training output y = W (x - mean) (weight 1, bias 0): W = (Y Xc^T) (Xc Xc^T)^-1."""
    model = nn.Sequential(GroupWhitening(24, 8, T=4), GroupWhitening(24, 6, T=3, track_running_stats=False))
    x = torch.randn(64, 24, dtype=F64) * torch.linspace(0.5, 2, 24, dtype=F64) + 0.3
    report = sdecor.whitening_report(model, x)
    twin, seen = copy.deepcopy(model), {}
    for name, layer in _whitening_layers(twin):
        layer.register_forward_hook(lambda l, i, o, name=name: seen.__setitem__(name, (i[0].clone(), o.clone())))
    with torch.no_grad():
        twin.train()(x)
    for record, (name, layer) in zip(report, _whitening_layers(model)):
        xin, y = seen[name]
        assert xin.dtype == y.dtype == F64
        d, G = layer.num_channels, layer.num_groups
        xc = (xin - xin.mean(0)).T.reshape(G, d, -1)                  # (G, d, m)
        yg = y.T.reshape(G, d, -1)
        w = (yg @ xc.mT) @ torch.linalg.inv(xc @ xc.mT)
        expected = hr.layer_health(xin, d, method=layer.method, eps=layer.eps, T=layer.T, w=w,
                                   running_wm=layer.running_wm if layer.track_running_stats else None)
        _check_record(record, expected)


def test_t_needed_is_the_smallest_newton_step_count_that_whitens():
    x = _spectral_batch(48, _spectra((8, 8), 3e3))
    report = sdecor.whitening_report(nn.Sequential(GroupWhitening(16, 8, eps=1e-6, dtype=F64)), x, tol=1e-4)
    t = report[0].t_needed
    assert bool((t > 1).all()) and report.tol == 1e-4
    for g in range(2):
        T = int(t[g])
        errors = []
        for steps in (T - 1, T):
            layer = GroupWhitening(16, 8, T=steps, eps=1e-6, dtype=F64)
            errors.append(sdecor.whitening_report(nn.Sequential(layer), x, tol=1e-4)[0].whitening_error[g].item())
        assert errors[0] >= 1e-4 > errors[1]
    # 100 steps do not whiten below 1e-15 in float64: -1
    none = sdecor.whitening_report(nn.Sequential(GroupWhitening(16, 8, dtype=F64)), x, tol=1e-15)
    assert torch.equal(none[0].t_needed, torch.full((2,), -1.0, dtype=F64))


def test_running_error_measures_the_running_matrix():
    x = torch.randn(16, 8, 3, dtype=F64) * 2
    fresh = GroupWhitening(8, 4, dtype=F64)                           # running matrices: the identity
    (record,) = sdecor.whitening_report(nn.Sequential(fresh), x)
    sigmas = hr.group_covariances(x, 4)
    expected = torch.tensor([float(torch.linalg.matrix_norm(s + 1e-5 * torch.eye(4, dtype=F64) - torch.eye(4, dtype=F64)))
                             / 2 for s in sigmas], dtype=F64)
    torch.testing.assert_close(record.running_error, expected, rtol=1e-12, atol=0)
    # a layer that saw this very batch at momentum 1 whitens it in eval mode as in training
    seen = GroupWhitening(8, 4, momentum=1.0, dtype=F64)
    seen(x)
    (record,) = sdecor.whitening_report(nn.Sequential(seen), x)
    torch.testing.assert_close(record.running_error, record.whitening_error, rtol=1e-12, atol=0)
    # without running statistics eval mode whitens with the batch's: the same error
    batch_only = GroupWhitening(8, 4, track_running_stats=False, dtype=F64)
    (record,) = sdecor.whitening_report(nn.Sequential(batch_only), x)
    torch.testing.assert_close(record.running_error, record.whitening_error, rtol=0, atol=0)
    expected = hr.layer_health(x, 4, tol=1e-3)                        # the contract's W (float64)
    _check_record(record, expected)


def test_autocast_input_in_bfloat16():
    model = _trained(Net())
    x = torch.randn(4, 3, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = sdecor.whitening_report(model, x)
        matrices = _layer_inputs_and_matrices(model, (x,))
    assert all(m[0].dtype == torch.bfloat16 for m in matrices.values())
    expected = _reference(model, (x,), matrices=matrices)
    for record in report:
        _check_record(record, expected[record.name])


# ---------------------------------------------------------------------------------------------------
# the model as it was


class Failing(nn.Module):
    def forward(self, x):
        raise RuntimeError("forward failed on purpose")


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: m.training for n, m in model.named_modules()},
            {n: p for n, p in model.named_parameters()},
            torch.get_rng_state(),
            {n: m.momentum for n, m in _whitening_layers(model)})


def _assert_unchanged(model, snapshot):
    state, flags, params, rng, momenta = snapshot
    assert {n: m.momentum for n, m in _whitening_layers(model)} == momenta
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(p is params[n] for n, p in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _model_with_batchnorm(**kw):
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Dropout(0.5), Net(c1=24, c0=16, **kw))
    return _trained(model)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_model_is_left_exactly_as_it_was(mode, momentum):
    model = _model_with_batchnorm(momentum=momentum)
    model.train(mode == "train")
    model[3].drop.eval()                                               # a mixed set of flags
    x = torch.randn(5, 3, 9, 9)
    before = _snapshot(model)
    first = sdecor.whitening_report(model, x)
    _assert_unchanged(model, before)
    second = sdecor.whitening_report(model, x)                        # the same random draws
    assert first == second
    _assert_unchanged(model, before)


def test_model_is_restored_when_the_forward_raises():
    model = _model_with_batchnorm()
    model.append(Failing())
    model.eval()
    x = torch.randn(5, 3, 9, 9)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="on purpose"):
        sdecor.whitening_report(model, x)
    _assert_unchanged(model, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_random_state_is_restored():
    model = _model_with_batchnorm().cuda()
    state = torch.cuda.get_rng_state_all()
    sdecor.whitening_report(model, torch.randn(5, 3, 9, 9, device="cuda"))
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), state))


# ---------------------------------------------------------------------------------------------------
# the report object


def test_json_round_trip(tmp_path):
    model = _trained(Net())
    report = sdecor.whitening_report(model, torch.randn(4, 3, 5, 5), tol=5e-4)
    path = tmp_path / "report.json"
    path.write_text(report.to_json(indent=2))
    data = json.loads(path.read_text())
    assert data["tol"] == 5e-4 and [layer["name"] for layer in data["layers"]] == ["wh1", "wh2"]
    layer = data["layers"][0]
    assert layer["group_sizes"] == [16, 16, 8] and layer["num_groups"] == 3
    assert all(isinstance(v, float) for field in FIELDS for v in layer[field])
    back = sdecor.WhiteningReport.from_json(path.read_text())
    assert back == report and sdecor.WhiteningReport.from_dict(report.to_dict()) == report
    for a, b in zip(back, report):
        for field in FIELDS:
            assert torch.equal(getattr(a, field), getattr(b, field))
    changed = report.to_dict()
    changed["layers"][1]["condition"][0] += 1.0
    assert sdecor.WhiteningReport.from_dict(changed) != report
    with pytest.raises(ValueError, match="data"):
        sdecor.WhiteningReport.from_dict({"layers": []})
    del changed["layers"][0]["eps_share"]
    with pytest.raises(ValueError, match="eps_share"):
        sdecor.WhiteningReport.from_dict(changed)


def test_sequence_and_worst():
    model = _trained(Net(T=2))
    report = sdecor.whitening_report(model, torch.randn(4, 3, 5, 5))
    assert len(report) == 2 and list(report) == [report[0], report[1]] and report[-1] is report[1]
    assert report["wh2"] is report[1] and len(report[:1]) == 1
    with pytest.raises(KeyError, match="nope"):
        report["nope"]
    worst = report.worst()
    assert isinstance(worst, sdecor.health.WorstGroup)
    errors = [(float(e), i, g) for i, r in enumerate(report) for g, e in enumerate(r.whitening_error)]
    value, i, g = max(errors, key=lambda t: t[0])
    assert worst.record is report[i] and worst.group == g and worst.value == value
    text = str(report)
    assert "wh1" in text and "wh2" in text and f"worst group: {worst.record.name} group {g}" in text
    assert repr(report) == "WhiteningReport(2 layers, tol=0.001)"


def test_sync_whitening_without_process_group():
    model = nn.Sequential(nn.Conv2d(3, 24, 1), SyncGroupWhitening(24, 8, method="zca"), nn.Conv2d(24, 20, 1),
                          SyncGroupWhiteningAct(20, 8, T=4, last_group="smaller", act=nn.ReLU()))
    model = _trained(model)
    x = torch.randn(6, 3, 4, 4)
    report = sdecor.whitening_report(model, x)
    assert [r.name for r in report] == ["1", "3"] and report[1].group_sizes == (8, 8, 4)
    _check_report(report, model, (x,))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(8, 16, 1), GroupWhitening(16, 8), nn.ReLU())
        self.unused = GroupWhitening(16, 4)                           # never called

    def forward(self, x):
        return self.body(x)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.stages = nn.ModuleList([Block(), nn.Sequential(Block())])
        self.skip = nn.Conv2d(3, 16, 1)

    def forward(self, a, b):
        h = self.stem(a)
        h = self.stages[0](h)
        h = self.stages[1][0].body[0](self.stem(b) + h[:, :8]).mul(1.0)
        return h + self.skip(a)


def test_nested_modules_qualified_names_and_tuple_input():
    model = Outer()
    a, b = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    report = sdecor.whitening_report(model, (a, b))
    # stages.1.0.body.1 is not reached by this forward, the unused layers never: left out
    assert [r.name for r in report] == ["stages.0.body.1"]
    _check_report(report, model, (a, b))
    assert [r.name for r in sdecor.whitening_report(model, [a, b])] == ["stages.0.body.1"]
    deep = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Sequential(nn.Sequential(nn.Identity(), GroupWhitening(8, 4))),
                         nn.Sequential(GroupWhitening(8, 8)))
    assert [r.name for r in sdecor.whitening_report(deep, a)] == ["1.0.1", "2.0"]


# ---------------------------------------------------------------------------------------------------
# bad input


class Skipping(nn.Module):
    def __init__(self):
        super().__init__()
        self.wh = GroupWhitening(3, 3)

    def forward(self, x):
        return x


def test_bad_input():
    model, x = Net(), torch.randn(4, 3, 5, 5)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        sdecor.whitening_report(lambda t: t, x)
    for bad in (x.numpy(), [x, 1], (), None):
        with pytest.raises(TypeError, match="x must be a tensor"):
            sdecor.whitening_report(model, bad)
    for bad in ("0.1", True, None, torch.tensor(0.1)):
        with pytest.raises(TypeError, match="tol must be a number"):
            sdecor.whitening_report(model, x, tol=bad)
    for bad in (0, -1e-3, math.inf, math.nan):
        with pytest.raises(ValueError, match="tol must be a finite number > 0"):
            sdecor.whitening_report(model, x, tol=bad)
    with pytest.raises(ValueError, match="model has no whitening layer"):
        sdecor.whitening_report(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), x)
    with pytest.raises(ValueError, match="none of model's 1 whitening layer"):
        sdecor.whitening_report(Skipping(), x)
    twice = nn.Sequential(nn.Conv2d(3, 8, 1), GroupWhitening(8, 4))
    twice.append(twice[1])
    before = _snapshot(twice)
    with pytest.raises(ValueError, match="'1' ran more than once"):
        sdecor.whitening_report(twice, x)
    _assert_unchanged(twice, before)


def test_newton_errors_per_step_count():
    # the error of T steps for every T, against the reference's Newton-Schulz matrix rerun per T
    x = _spectral_batch(40, _spectra((8, 8), 1e4))
    sigmas = hr.group_covariances(x, 8)
    s = torch.stack([sg + 1e-5 * torch.eye(8, dtype=F64) for sg in sigmas])
    errors = sdecor.health.newton_errors(s, 30)
    assert errors.shape == (30, 2) and errors.dtype == F64
    for T in (1, 5, 17, 30):
        for g in range(2):
            want = hr.whitening_error(sdecor.reference.newton_schulz(s[g], T), s[g])
            assert math.isclose(errors[T - 1, g].item(), want, rel_tol=1e-9, abs_tol=64 * U64 * 8 * 1e4)
    # its first value below tol is the report's t_needed
    report = sdecor.whitening_report(nn.Sequential(GroupWhitening(16, 8, dtype=F64)), x, tol=1e-4)
    full = sdecor.health.newton_errors(s, 100)
    for g in range(2):
        below = (full[:, g] < 1e-4).nonzero()
        assert report[0].t_needed[g].item() == (below[0].item() + 1 if len(below) else -1)
    # float32 input runs in float64
    assert torch.equal(sdecor.health.newton_errors(s.float(), 3), sdecor.health.newton_errors(s.float().double(), 3))
    with pytest.raises(TypeError, match="s must be a tensor"):
        sdecor.health.newton_errors(s.numpy(), 3)
    for bad in (s[0], s.to(torch.int64), s[:, :, :7]):
        with pytest.raises(ValueError, match=r"s must be a \(B, d, d\) floating-point tensor"):
            sdecor.health.newton_errors(bad, 3)
    for bad in (0, 101):
        with pytest.raises(ValueError, match="max_T must be an int from 1 to 100"):
            sdecor.health.newton_errors(s, bad)
    for bad in (2.0, True):
        with pytest.raises(TypeError, match="max_T must be an int"):
            sdecor.health.newton_errors(s, bad)
