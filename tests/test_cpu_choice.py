"""The CPU choice table (docs/design.md, "Backends"): pinned cell by cell, followed by auto-selection
on CPU tensors, overridden by a forced backend, and given way to torch without the extension."""

import subprocess
import sys

import pytest
import torch

import sdecor
from sdecor import _backend, _cpu_choice, _ext
from sdecor import reference as ref
from sdecor.ops import cov, cov_native, topk, topk_native, topk_torch, whiten, whiten_native, whiten_torch

needs_native = pytest.mark.skipif(not _ext.available(), reason="the native extension is not built")

N, T = "native", "torch"

# Every cell, written out: op -> dtype -> backend per range of d (d <= 32, 33..64, 65..128, > 128),
# or one backend for an op without a group size. Measured with `sdecor bench --suite choice-cpu`.
EXPECTED = {
    "group_cov": {
        "float32": (N, N, N, N),
        "float64": (N, N, N, N),
        "bfloat16": (N, N, N, N),
        "float16": (N, N, N, N),
    },
    "group_whiten_train": {
        "float32": (N, N, N, N),
        "float64": (N, N, N, N),
        "bfloat16": (N, N, N, N),
        "float16": (N, N, N, N),
    },
    "group_whiten_eval": {
        "float32": (N, N, N, N),
        "float64": (N, N, N, N),
        "bfloat16": (N, N, N, N),
        "float16": (N, N, N, N),
    },
    "whitening_matrix": {
        "float32": (T, T, T, T),
        "float64": (T, T, T, T),
    },
    "topk_mask": {
        "float32": N,
        "float64": N,
        "bfloat16": N,
        "float16": N,
    },
}


def test_the_table_is_pinned():
    assert _cpu_choice.D_BOUNDS == (32, 64, 128)
    assert _cpu_choice.COLUMNS == ("d<=32", "d33-64", "d65-128", "d>128")
    assert _cpu_choice.CHOICE == EXPECTED
    assert _cpu_choice.SAME_ROW == {"group_whiten": "group_whiten_train"}


def test_the_columns_are_ranges_of_d():
    assert [_cpu_choice.column(d) for d in (1, 16, 32, 33, 64, 65, 128, 129, 1024)] == [0, 0, 0, 1, 1, 2, 2, 3, 3]


def test_every_cell_names_a_backend_the_op_implements_on_the_cpu():
    supports = {"group_cov": cov.SUPPORTS, "topk_mask": topk.SUPPORTS,
                "group_whiten_train": whiten.SUPPORTS["group_whiten_train"],
                "group_whiten_eval": whiten.SUPPORTS["group_whiten_eval"],
                "whitening_matrix": whiten.SUPPORTS["whitening_matrix[zca]"]}
    assert set(_cpu_choice.CHOICE) == set(supports)
    for op, rows in _cpu_choice.CHOICE.items():
        assert set(supports[op]["cpu"]) == {"native", "torch"}, op
        for dtype, row in rows.items():
            assert _cpu_choice.DTYPE_NAMES[getattr(torch, dtype)] == dtype
            cells = (row,) if op == "topk_mask" else row
            assert op == "topk_mask" or len(row) == len(_cpu_choice.COLUMNS), (op, dtype)
            assert set(cells) <= {"native", "torch"}, (op, dtype)


def test_lookup():
    for op, rows in EXPECTED.items():
        for dtype, row in rows.items():
            dt = getattr(torch, dtype)
            if isinstance(row, str):
                assert _cpu_choice.choice(op, dt) == _cpu_choice.choice(op, dt, 16) == row
                continue
            for d, want in zip((1, 32, 33, 64, 65, 128, 129, 512), (0, 0, 1, 1, 2, 2, 3, 3)):
                assert _cpu_choice.choice(op, dt, d) == row[want], (op, dtype, d)
            assert _cpu_choice.choice(op, dt, None) is None               # the row depends on d
    assert _cpu_choice.choice("group_whiten", torch.float32, 16) == _cpu_choice.choice("group_whiten_train",
                                                                                     torch.float32, 16)
    assert _cpu_choice.choice("group_cov", torch.int64, 16) is None
    assert _cpu_choice.choice("no_such_op", torch.float32, 16) is None


# ---------------------------------------------------------------------------------------------------
# which backend ran: the entry points of each backend, wrapped


@pytest.fixture
def ran(monkeypatch):
    """A list that records the backend of every call of an op's backend entry point."""
    calls = []
    entries = [(cov_native, "group_cov_native", N), (ref, "group_cov_unchecked", T),
               (whiten_native, "train_native", N), (whiten_torch, "train_torch", T),
               (whiten_native, "eval_native", N), (whiten_torch, "eval_torch", T),
               (whiten_native, "zca_matrix_native", N), (ref, "whitening_matrix_unchecked", T),
               (topk_native, "topk_mask_native", N), (topk_torch, "topk_mask_torch", T)]
    for module, name, backend in entries:
        def spy(*args, _real=getattr(module, name), _backend=backend, **kwargs):
            calls.append(_backend)
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    return calls


def run_op(op: str, d: int, dtype: torch.dtype):
    """One call of ``op`` on CPU tensors of ``dtype`` with group size ``d`` (2 groups)."""
    x = torch.randn(3, 2 * d, 4).to(dtype)
    if op == "group_cov":
        return sdecor.group_cov(x, d)
    if op == "group_whiten_train":
        return whiten.group_whiten_train(x, d)
    if op == "group_whiten":
        return sdecor.group_whiten(x, d)
    if op == "GroupWhitening":
        return sdecor.GroupWhitening(2 * d, num_channels=d).to(dtype)(x)
    if op == "group_whiten_eval":
        sd = torch.float64 if dtype == torch.float64 else torch.float32
        return whiten.group_whiten_eval(x, torch.zeros(2, d, dtype=sd), torch.eye(d, dtype=sd).repeat(2, 1, 1))
    if op == "whitening_matrix":
        a = torch.randn(2, d, 3 * d, dtype=dtype)
        return sdecor.whitening_matrix(a @ a.transpose(-1, -2) / (3 * d), "zca")
    if op == "topk_mask":
        return sdecor.topk_mask(x, x, ratio=0.5)
    raise AssertionError(op)


CELLS = [("group_cov", 16, torch.float32), ("group_cov", 64, torch.bfloat16), ("group_cov", 160, torch.float64),
         ("group_whiten_train", 16, torch.float32), ("group_whiten_train", 48, torch.float16),
         ("group_whiten_train", 96, torch.float64), ("group_whiten", 8, torch.bfloat16),
         ("GroupWhitening", 16, torch.float32), ("group_whiten_eval", 16, torch.float32),
         ("group_whiten_eval", 80, torch.bfloat16), ("group_whiten_eval", 144, torch.float64),
         ("whitening_matrix", 8, torch.float32), ("whitening_matrix", 40, torch.float64),
         ("whitening_matrix", 100, torch.float32), ("topk_mask", 4, torch.float32), ("topk_mask", 4, torch.float16)]
ROW = {"group_whiten": "group_whiten_train", "GroupWhitening": "group_whiten_train"}


@needs_native
@pytest.mark.parametrize("op, d, dtype", CELLS, ids=lambda v: str(v).replace("torch.", ""))
def test_auto_selection_runs_the_tables_choice(ran, op, d, dtype):
    run_op(op, d, dtype)
    want = _cpu_choice.choice(ROW.get(op, op), dtype, d)
    assert ran == [want], (op, d, dtype)


# a table that picks both backends, so that following it shows whatever the measured table says
MIXED = {"group_cov": {"float32": (T, N, T, N)}, "group_whiten_train": {"float32": (N, T, N, T)},
         "group_whiten_eval": {"float32": (T, N, T, N)}, "whitening_matrix": {"float32": (N, T, N, T)},
         "topk_mask": {"float32": T, "float64": N}}


@pytest.fixture
def mixed(monkeypatch):
    monkeypatch.setattr(_cpu_choice, "CHOICE", MIXED)
    return MIXED


@needs_native
@pytest.mark.parametrize("op", ["group_cov", "group_whiten_train", "group_whiten", "group_whiten_eval",
                                "whitening_matrix"])
def test_auto_selection_follows_each_range_of_d(ran, mixed, op):
    row = mixed[ROW.get(op, op)]["float32"]
    for d, col in ((8, 0), (40, 1), (72, 2), (136, 3)):
        ran.clear()
        run_op(op, d, torch.float32)
        assert ran == [row[col]], (op, d)


@needs_native
def test_auto_selection_follows_the_dtype(ran, mixed):
    run_op("topk_mask", 4, torch.float32)
    run_op("topk_mask", 4, torch.float64)
    assert ran == [T, N]
    ran.clear()
    run_op("group_cov", 8, torch.float64)                 # no row: the op's CPU order, native first
    run_op("whitening_matrix", 8, torch.float64)          # no row: zca's CPU order, torch first
    assert ran == [N, T]


@needs_native
def test_select_without_d_keeps_the_supports_order(mixed):
    x = torch.randn(2, 8, 3)
    assert _backend.select("group_cov", {"x": x}, cov.SUPPORTS) == N
    assert _backend.select("group_cov", {"x": x}, cov.SUPPORTS, 8) == T
    assert _backend.select("topk_mask", {"x": x, "saliency": x}, topk.SUPPORTS) == T


@needs_native
def test_a_forced_backend_overrides_the_table(ran, mixed, monkeypatch):
    with sdecor.use_backend("native"):
        run_op("group_cov", 8, torch.float32)              # the table: torch
    with sdecor.use_backend("torch"):
        run_op("group_cov", 40, torch.float32)             # the table: native
    assert ran == [N, T]
    ran.clear()
    monkeypatch.setenv("SDECOR_BACKEND", "native")
    run_op("group_whiten_train", 40, torch.float32)        # the table: torch
    with sdecor.use_backend(None):                         # automatic again: the table
        run_op("group_whiten_train", 40, torch.float32)
    assert ran == [N, T]


def test_forced_errors_are_unchanged(mixed, monkeypatch):
    cov_ = torch.eye(4).expand(2, 4, 4)
    with sdecor.use_backend("native"):                     # newton has no native kernel on the CPU
        with pytest.raises(sdecor.BackendUnavailableError, match="no implementation for cpu tensors"):
            sdecor.whitening_matrix(cov_, "newton")
    monkeypatch.setattr(_ext, "error", lambda: "the native extension sdecor._C is not available (x)")
    with sdecor.use_backend("native"):
        with pytest.raises(sdecor.BackendUnavailableError, match="sdecor._C is not available"):
            sdecor.group_cov(torch.randn(2, 8, 3), 4)


@pytest.mark.parametrize("op", ["group_cov", "group_whiten_train", "group_whiten_eval", "whitening_matrix",
                                "topk_mask"])
def test_without_the_extension_auto_selection_runs_torch(ran, monkeypatch, op):
    monkeypatch.setattr(_ext, "error", lambda: "the native extension sdecor._C is not available (x)")
    table = {o: {dt: N if isinstance(r, str) else (N,) * len(r) for dt, r in rows.items()}
             for o, rows in _cpu_choice.CHOICE.items()}
    monkeypatch.setattr(_cpu_choice, "CHOICE", table)      # native everywhere: it cannot run
    for d in (8, 40, 72, 136):
        run_op(op, d, torch.float32)
    assert ran == [T] * 4


def test_triton_is_never_picked_on_the_cpu_by_the_table(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_cpu_choice, "CHOICE", {"group_cov": {"float32": ("triton",) * 4}})
    assert _backend.select("group_cov", {"x": torch.randn(2, 8, 3)}, cov.SUPPORTS, 4) in (N, T)


def test_info_shows_the_table():
    data = sdecor.info()
    assert data["cpu_choice"] == _cpu_choice.table()
    assert data["cpu_choice"]["group_cov"]["float32"] == dict(zip(_cpu_choice.COLUMNS, EXPECTED["group_cov"]["float32"]))
    assert data["cpu_choice"]["topk_mask"]["float16"] == {"any d": EXPECTED["topk_mask"]["float16"]}
    out = subprocess.run([sys.executable, "-m", "sdecor", "info"], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    start = lines.index("cpu_choice:")
    row = EXPECTED["group_whiten_train"]["float32"]
    assert "    float32: " + ", ".join(f"{c} {b}" for c, b in zip(_cpu_choice.COLUMNS, row)) in lines[start:]


def test_a_backend_is_not_chosen_above_the_largest_d_it_takes(ran, monkeypatch):
    from sdecor import _native

    assert _cpu_choice.MAX_D == {("whitening_matrix", "native"): _native.EIGH_SMALL_MAX_DIM}
    monkeypatch.setattr(_cpu_choice, "CHOICE", {"whitening_matrix": {"float32": (N, N, N, N)}})
    assert _cpu_choice.choice("whitening_matrix", torch.float32, 128) == N
    assert _cpu_choice.choice("whitening_matrix", torch.float32, 129) is None
    run_op("whitening_matrix", 136, torch.float32)        # zca's CPU order: torch first
    assert ran == [T]
