"""decorrelation_loss and SaliencyDecor on the global batch over torch.distributed: 3 gloo worker
processes on the loopback interface (tests/decor_worker.py), checked against one process on the
concatenated batch; and the paths without a group or at world size 1, bit for bit."""

import datetime
import inspect

import pytest
import torch
import torch.distributed as dist

import sdecor
from sdecor._decorrelation import decorrelation
from sdecor.ops.cov import run_group_cov

from decor_worker import case_x, launch, offsets, sd_batch, sd_model, sd_objective, sgd_step

F32, F64 = torch.float32, torch.float64
RTOL = 1e-5
SIZES = (3, 5, 0)                                                     # rank 2 holds no sample
WORLD = len(SIZES)


def case(id, kind="decov", dtype=F32, shape=(16, 3), d=8, last_group="even", seed=0, **kw):
    return dict(id=id, kind=kind, dtype=dtype, shape=shape, d=d, last_group=last_group, seed=seed,
                sizes=SIZES, **kw)


CASES = [
    case("decov-f32"),
    case("corr-f32", kind="corr", seed=1),
    case("decov-f64-4d", dtype=F64, shape=(16, 2, 3), d=4, seed=2),
    case("corr-f64-2d", kind="corr", dtype=F64, shape=(16,), seed=3),
    case("decov-f32-smaller", shape=(20, 3), last_group="smaller", seed=4),          # groups 8, 8, 4
    case("corr-f32-smaller", kind="corr", shape=(20,), last_group="smaller", seed=5),
    case("decov-f64-smaller", dtype=F64, shape=(11, 2), d=4, last_group="smaller", seed=6),   # 4, 4, 3
    case("corr-f64-smaller", kind="corr", dtype=F64, shape=(11, 2), d=4, last_group="smaller", seed=7),
    case("decov-f32-one-smaller-group", shape=(5, 3), last_group="smaller", seed=8),  # C < d: one group of 5
    # per-rank means 1e4 apart, variance 1 within a rank
    case("decov-f32-ranks-1e4-apart", spread=1e4, seed=9),
    case("corr-f32-ranks-1e4-apart", kind="corr", spread=1e4, seed=10),
    case("decov-f64-ranks-1e4-apart", dtype=F64, spread=1e4, seed=11),
    case("corr-f64-ranks-1e4-apart", kind="corr", dtype=F64, spread=1e4, seed=12),
    # every mean near 1e4, variance 1 over all ranks: the covariance is 1e-8 of the squared means
    case("decov-f32-means-1e4", offset=1e4, seed=13),
    case("corr-f32-means-1e4", kind="corr", offset=1e4, seed=14),
    case("decov-f64-means-1e4", dtype=F64, offset=1e4, seed=15),
    case("corr-f64-means-1e4", kind="corr", dtype=F64, offset=1e4, seed=16),
    # x x^T beyond float64's range: each group scaled by a power of two common to all ranks
    case("corr-f64-huge", kind="corr", dtype=F64, scale=1e200, seed=17),
    case("corr-f64-huge-smaller", kind="corr", dtype=F64, shape=(11, 2), d=4, last_group="smaller",
         scale=1e200, seed=18),
]


def sd_spec(id, kind, dtype, seed, per_rank=False):
    return dict(id=id, kind=kind, dtype=dtype, seed=seed, sizes=(4, 4, 4), lr=0.5, lambda_decor=1.0,
                per_rank=per_rank)


# per_rank: the workers also take the step with the per-rank decorrelation term (process_group=None)
SALIENCY = [sd_spec("decov-f64", "decov", F64, 30, per_rank=True), sd_spec("corr-f32", "corr", F32, 31)]
SHORT_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every rank's results: one launch of 3 workers runs all the parts."""
    spec = {"cases": CASES, "saliency": SALIENCY, "short_timeout": SHORT_TIMEOUT, "hold": SHORT_TIMEOUT + 4}
    return launch(tmp_path_factory.mktemp("decor_global"), WORLD, spec, timeout=150, pg_timeout=60)


def assert_rel(actual, expected, msg, rtol=RTOL):
    """|actual - expected| <= rtol * max |expected|, elementwise (relative to the tensor's scale)."""
    expected = expected.to(actual.dtype)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=msg)


def single_process(c, dtype):
    """decorrelation_loss on the concatenated batch in this process: the loss and the input gradient."""
    x = case_x(c).to(dtype).requires_grad_()
    loss = sdecor.decorrelation_loss(x, c["d"], kind=c["kind"], last_group=c["last_group"])
    loss.backward()
    return loss.detach(), x.grad


def payload(c) -> int:
    """sum x and sum x x^T of every group: G (d + d^2), a smaller last group r + r^2."""
    C, d = c["shape"][0], c["d"]
    sizes = [d] * (C // d) + ([C % d] if C % d else [])
    return sum(s + s * s for s in sizes)


@pytest.mark.parametrize("c", CASES, ids=lambda c: c["id"])
def test_loss_and_gradients_are_those_of_the_concatenated_batch(ranks, c):
    loss, grad = single_process(c, c["dtype"])
    oracle_loss, oracle_grad = single_process(c, F64)               # the same values, in float64
    refs = [(oracle_loss, oracle_grad, "float64")]
    # Where the means lie 1e4 standard deviations from 0 the float32 computation in one process is no
    # reference to 1e-5 itself (corr-f32-ranks-1e4-apart: its input gradient is 5e-4 off the float64
    # one); there the float64 computation on the same values is.
    if not (c["dtype"] == F32 and (c.get("spread") or c.get("offset"))):
        refs.append((loss, grad, "single process"))
    for rank, (lo, hi) in enumerate(offsets(c["sizes"])):
        rec = ranks[rank]["cases"][c["id"]]
        assert rec["loss"].dtype == loss.dtype and rec["gx"].dtype == c["dtype"]
        # the same number on every rank, bit for bit
        assert torch.equal(rec["loss"], ranks[0]["cases"][c["id"]]["loss"]), f"loss, rank {rank}"
        assert rec["gx"].shape == grad[lo:hi].shape
        for ref_loss, ref_grad, what in refs:
            assert_rel(rec["loss"], ref_loss, f"loss vs {what}, rank {rank}")
            if hi > lo:
                assert_rel(rec["gx"], ref_grad[lo:hi], f"input gradient vs {what}, rank {rank}")
        # forward: the header (6 int64 per rank), [float64 "corr": G exponents], the moments; backward: none
        calls = rec["fwd"]
        assert calls[0] == ("all_reduce", 6 * WORLD, 8) and calls[-1] == ("all_reduce", payload(c), 8), calls
        G = -(-c["shape"][0] // c["d"])
        assert calls[1:-1] == ([("all_reduce", G, 8)] if c["kind"] == "corr" and c["dtype"] == F64 else [])
        assert rec["bwd"] == []


@pytest.mark.parametrize("spec", SALIENCY, ids=lambda s: s["id"])
def test_saliency_decor_ddp_step_is_the_single_process_step(ranks, spec):
    x, y = sd_batch(spec)
    model = sd_model(spec["seed"], spec["dtype"])
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    ref = sgd_step(sd_objective(model, spec), model, x, y, spec["lr"])
    steps = [ranks[r]["saliency"][spec["id"]] for r in range(WORLD)]
    for rank, step in enumerate(steps):
        for name, p in ref["params"].items():
            assert torch.equal(step["global"]["params"][name], steps[0]["global"]["params"][name])
            assert_rel(step["global"]["params"][name], p, f"{name} after the step, rank {rank}")
            if spec["dtype"] == F64:                                 # the update itself, exactly resolved
                assert_rel(step["global"]["params"][name] - before[name], p - before[name],
                           f"update of {name}, rank {rank}")
        # the decorrelation term is the global one on every rank; the others are rank means
        assert_rel(step["global"]["terms"][3], ref["terms"][3], f"decorrelation term, rank {rank}")
    for i, term in enumerate(("total", "ce", "consistency")):
        mean = sum(s["global"]["terms"][i] for s in steps) / WORLD
        assert_rel(mean, ref["terms"][i], f"mean of {term} over the ranks")
    # the test tells the scalings apart: per-rank decorrelation, or the global term's gradient
    # without the factor W, move the parameters elsewhere
    model = sd_model(spec["seed"], spec["dtype"])
    others = [sgd_step(sd_objective(model, dict(spec, lambda_decor=spec["lambda_decor"] / WORLD)), model, x, y,
                       spec["lr"])["params"]]
    if spec["per_rank"]:
        others.append(steps[0]["per_rank"]["params"])
    for other in others:
        gap = max(((other[k] - ref["params"][k]).abs().max() / (ref["params"][k] - before[k]).abs().max()).item()
                  for k in ref["params"])
        assert gap > 100 * RTOL, gap


def test_different_channel_counts_raise_on_every_rank(ranks):
    messages = set()
    for rank in range(WORLD):
        bad = ranks[rank]["bad"]
        kind, msg = bad["channels"]
        assert kind == "ValueError" and "channel counts C 16, 12, 16 on ranks 0, 1, 2" in msg, msg
        messages.add(msg)
        assert bad["channels_calls"] == [("all_reduce", 6 * WORLD, 8)]            # the header only
        kind, msg = bad["group_size"]
        assert kind == "ValueError" and "num_channels 4, 8, 8" in msg, msg
        kind, msg = bad["kind"]
        assert kind == "ValueError" and "kind 'decov', 'decov', 'corr'" in msg, msg
        kind, msg = bad["too_few"]
        assert kind == "ValueError" and "m = 1, 0, 0 on ranks 0, 1, 2" in msg, msg
    assert len(messages) == 1


def test_a_rank_whose_arguments_fail_makes_every_rank_raise(ranks):
    kind, msg = ranks[2]["bad"]["one_rank_fails"]
    assert kind == "ValueError" and "must divide the channel count C=12" in msg, msg
    for rank in (0, 1):
        kind, msg = ranks[rank]["bad"]["one_rank_fails"]
        assert kind == "ValueError" and "rank 2 failed" in msg and "16, 16, 12" in msg, msg
    for rank in range(WORLD):
        assert ranks[rank]["bad"]["one_rank_fails_calls"] == [("all_reduce", 6 * WORLD, 8)]


def test_the_group_still_works_after_bad_input(ranks):
    values = [ranks[r]["bad"]["good_after_bad"] for r in range(WORLD)]
    assert all(v[0] == "ok" for v in values), values
    assert all(torch.equal(v[1], values[0][1]) for v in values) and torch.isfinite(values[0][1])


def test_not_a_process_group_is_refused_before_any_collective(ranks):
    for rank in range(WORLD):
        bad = ranks[rank]["bad"]
        for name, words in (("not_a_group", "got str 'WORLD'"), ("non_member", "new_group"),
                            ("objective_not_a_group", "got int 3")):
            kind, msg = bad[name]
            assert kind == "TypeError" and "process_group" in msg and words in msg, (name, msg)
            assert bad[name + "_calls"] == []


def test_a_rank_that_never_joins_gives_the_others_the_group_timeout(ranks):
    assert ranks[0]["timeout"] == ("skipped", None)
    for rank in (1, 2):
        kind, msg = ranks[rank]["timeout"]
        assert kind in ("RuntimeError", "DistBackendError") and "timed out" in msg.lower(), (kind, msg)
        # new_group(timeout=3 s): not before it, and not much after
        assert SHORT_TIMEOUT - 0.5 <= ranks[rank]["timeout_seconds"] <= SHORT_TIMEOUT + 30


# ---------------------------------------------------------------------------------------------------
# one process: no group, world size 1, bad groups


LOCAL = [("decov", F32, (6, 16, 3), 8, "even"), ("corr", F32, (6, 16), 4, "even"),
         ("decov", F64, (5, 20, 2, 2), 8, "smaller"), ("corr", F64, (7, 11, 3), 4, "smaller")]


def _local_runs(process_group):
    """(loss, input gradient) of decorrelation_loss with process_group, and of the computation it
    made before process_group existed (the checks, then decorrelation on group_cov)."""
    out = []
    for i, (kind, dtype, shape, d, last_group) in enumerate(LOCAL):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(i), dtype=dtype)
        runs = []
        for fn in (lambda t: sdecor.decorrelation_loss(t, d, kind, last_group, process_group=process_group),
                   lambda t: decorrelation(t, d, kind, run_group_cov)):
            t = x.clone().requires_grad_()
            loss = fn(t)
            loss.backward()
            runs.append((loss.detach(), t.grad))
        out.append(runs)
    return out


def _assert_bitwise(runs):
    for (loss, grad), (old_loss, old_grad) in runs:
        assert loss.dtype == old_loss.dtype and torch.equal(loss, old_loss) and torch.equal(grad, old_grad)


def _saliency_terms(process_group):
    spec = sd_spec("local", "corr", F32, 40)
    x, y = sd_batch(dict(spec, sizes=(6,)))
    model = sd_model(spec["seed"])
    return sgd_step(sd_objective(model, spec, process_group), model, x, y, spec["lr"])


def test_without_a_group_it_is_the_single_process_computation_bit_for_bit():
    assert not dist.is_initialized()
    _assert_bitwise(_local_runs(None))


def test_world_size_one_is_the_single_process_computation_bit_for_bit(tmp_path, monkeypatch):
    calls = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: calls.append(a) or real(*a, **k))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        _assert_bitwise(_local_runs(dist.group.WORLD))
        one, plain = _saliency_terms(dist.group.WORLD), _saliency_terms(None)
        assert all(torch.equal(a, b) for a, b in zip(one["terms"], plain["terms"]))
        assert all(torch.equal(one["params"][k], plain["params"][k]) for k in plain["params"])
    finally:
        dist.destroy_process_group()
    assert calls == []


@pytest.mark.parametrize("bad", ["WORLD", 0, object(), dist.GroupMember.NON_GROUP_MEMBER],
                         ids=["str", "int", "object", "non-member"])
def test_not_a_process_group_is_a_type_error_naming_it(bad):
    x = torch.randn(4, 16)
    with pytest.raises(TypeError, match="process_group"):
        sdecor.decorrelation_loss(x, 8, process_group=bad)
    with pytest.raises(TypeError, match="process_group"):                # before the other checks
        sdecor.decorrelation_loss(x, 5, kind="nope", process_group=bad)
    with pytest.raises(TypeError, match="process_group"):                # at construction
        sdecor.SaliencyDecor(sd_model(0), process_group=bad)


def test_signatures():
    for fn in (sdecor.decorrelation_loss, sdecor.SaliencyDecor):
        p = inspect.signature(fn).parameters["process_group"]
        assert p.default is None
