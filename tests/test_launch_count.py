"""Launches per call of the Triton path, counted under the Triton interpreter (sdecor.cli.bench.launches).

The launch counts are the design (docs/design.md, "Floors", GPU): a GroupWhitening training forward is
a statistics kernel (the Newton steps in its finalize program, for every d) and an apply kernel; the
backward a reduce kernel, the d x d backward and a dx kernel; topk_mask is a score, a select and a fill
kernel for every fill. The counts do not depend on the shape, so small inputs stand for the report's.
"""

import pytest

pytest.importorskip("triton")

from sdecor.cli.bench import launches  # noqa: E402

pytestmark = pytest.mark.skipif(not launches.interpreter_on(),
                                reason="launches are counted under the Triton interpreter (TRITON_INTERPRET=1)")

CASES = {c["case"]: c for c in launches.WHITEN_CASES}

FORWARD = {"group_stats_partial_kernel": 1, "group_stats_finalize_kernel": 1, "whiten_apply_kernel": 1}
BACKWARD = {"whiten_bwd_reduce_kernel": 1, "newton_bwd_kernel": 1, "whiten_bwd_dx_kernel": 1}
# case -> (forward launches, backward launches) by kernel
DESIGN = {
    "newton-d16": (FORWARD, BACKWARD),
    "newton-d16-smaller-last": (FORWARD, BACKWARD),
    # the zca backward's d x d part is torch ops (the eigenvectors' formula), no kernel of its own
    "zca-d16": (FORWARD, {"whiten_bwd_reduce_kernel": 1, "whiten_bwd_dx_kernel": 1}),
    # above d = 32 too, the Newton steps run in the finalize program (in tiles of a scratch buffer)
    "newton-d64": (FORWARD, BACKWARD),
}


@pytest.fixture(scope="module")
def whitening():
    return {name: launches.whitening_counts(case, (4, case["shape"][1], 4, 4)) for name, case in CASES.items()}


@pytest.mark.parametrize("name", list(DESIGN))
def test_whitening_launches_per_pass(whitening, name):
    r = whitening[name]
    forward, backward = DESIGN[name]
    assert r["forward"]["launches"] == forward
    assert r["backward"]["launches"] == backward
    assert r["forward"]["launch_total"] == sum(forward.values())
    assert r["backward"]["launch_total"] == sum(backward.values())
    # the design: at most 3 launches per pass, for every d
    assert r["forward"]["launch_total"] <= 3 and r["backward"]["launch_total"] <= 3
    # only zca runs a native op: the eigensolver, once, in the forward
    assert r["forward"]["native"] == ({"sdecor::eigh_small": 1} if CASES[name]["method"] == "zca" else {})
    assert r["backward"]["native"] == {}


def test_other_ops_are_counted_apart_from_views_and_the_interpreter(whitening):
    for r in whitening.values():
        for part in ("forward", "backward"):
            c = r[part]
            assert set(c["work"]) <= set(c["ops"]) and c["work_total"] <= c["op_total"]
            assert all(c["work"][k] <= c["ops"][k] for k in c["work"])
            assert not set(c["work"]) & launches.NO_WORK - {"aten::contiguous", "aten::to", "aten::reshape"}
            # the interpreter copies every argument to the host and back (new_empty, set_, copy_) inside
            # each launch: none of that is counted as the path's
            assert "aten::set_" not in c["ops"] and "aten::copy_" not in c["ops"]
    # a training forward updates the running statistics beside its kernels
    assert whitening["newton-d16"]["forward"]["work_total"] >= 1


@pytest.mark.parametrize("fill", launches.FILLS)
def test_topk_mask_launches_per_fill(fill):
    case = next(c for c in launches.TOPK_CASES if c["fill"] == fill)
    r = launches.topk_counts(case, (4, 3, 8, 8))
    call = r["call"]
    assert call["launches"] == {"topk_score_kernel": 1, "topk_select_kernel": 1, "topk_fill_kernel": 1}
    assert call["launch_total"] == 3 and call["native"] == {}
    assert "aten::set_" not in call["ops"] and "aten::copy_" not in call["ops"]


def test_the_counter_unhooks_and_the_report_reads_the_rows(whitening):
    from triton.runtime import interpreter

    original = interpreter.GridExecutor.__call__
    with launches.counting_launches() as counts:
        assert interpreter.GridExecutor.__call__ is not original
    assert interpreter.GridExecutor.__call__ is original and counts == {}
    doc = dict(whitening=[whitening["newton-d16"]], topk_mask=[])
    rows = launches.rows(doc)
    assert [(r["case"], r["part"], r["launch_total"]) for r in rows] == [("newton-d16", "forward", 3),
                                                                         ("newton-d16", "backward", 3)]
    assert rows[0]["d"] == 16 and rows[0]["method"] == "newton"
    text = "\n".join(launches.format_launches(doc))
    assert "Launches per call" in text and "group_stats_partial, group_stats_finalize, whiten_apply" in text
    assert "not counted: why" in "\n".join(launches.format_launches(None, "why"))
