"""The CPU choice table: which backend auto-selection runs on CPU tensors, per op, dtype and group size.

For every op with both a ``native`` (C++) and a ``torch`` implementation on the CPU, :data:`CHOICE`
names the faster of the two per input dtype and per range of the group size d (``num_channels``;
for whitening_matrix the side d of the d x d matrices). The ranges are the columns of
:data:`D_BOUNDS`: d <= 32, 33 <= d <= 64, 65 <= d <= 128, d > 128. An op without a group size
(topk_mask) has one backend per dtype.

The entries come from a measurement,
``python -m sdecor bench --suite choice-cpu --threads 2 --device cpu`` (:mod:`sdecor.cli.bench.choice`),
which times both backends on every cell, prints the measured table beside this one with the cells
where they disagree flagged, and prints the measured table as a literal to put here. The entries
below are those of a run on a 2-core Intel Xeon shared with other work (--threads 2): native faster
on every cell of group_cov, group whitening and topk_mask (the median native / torch time of a cell
0.09x to 0.93x), torch (LAPACK's eigh) on every measured cell of whitening_matrix (1.03x to 16.8x);
the Jacobi solver takes d <= 128 (:data:`MAX_D`). No op turned from one backend to the other
between d = 8 and d = 256 in that run; the ranges are where a measurement may show such a turn.

:func:`sdecor._backend.select` consults the table only for CPU tensors and only when no backend is
forced; a choice the op cannot run (no extension built, a dtype its kernel does not take) gives way
to the next backend the op implements. A dtype or op absent from the table keeps the op's
``SUPPORTS`` order.
"""

from __future__ import annotations

import torch

__all__ = ["CHOICE", "COLUMNS", "D_BOUNDS", "DTYPE_NAMES", "MAX_D", "SAME_ROW", "choice", "column", "table"]

# upper bounds (inclusive) of the d ranges; the last column holds every larger d
D_BOUNDS = (32, 64, 128)
COLUMNS = ("d<=32", "d33-64", "d65-128", "d>128")

# ops whose auto-selection reads another op's row: group_whiten is the training path
SAME_ROW = {"group_whiten": "group_whiten_train"}

# the largest d a backend of an op takes: the Jacobi eigensolver's (sdecor._native.EIGH_SMALL_MAX_DIM);
# above it a cell's choice gives way to the op's SUPPORTS order
MAX_D = {("whitening_matrix", "native"): 128}

# op -> dtype -> backend for each column of D_BOUNDS (or one backend for every d).
# whitening_matrix: method="zca" (Jacobi eigensolver against LAPACK's eigh); newton runs on torch
# only on the CPU, so its row never applies. topk_mask: no group size, one backend per dtype.
CHOICE = {
    #                       d<=32     d33-64    d65-128   d>128
    "group_cov": {
        "float32":         ("native", "native", "native", "native"),
        "float64":         ("native", "native", "native", "native"),
        "bfloat16":        ("native", "native", "native", "native"),
        "float16":         ("native", "native", "native", "native"),
    },
    "group_whiten_train": {
        "float32":         ("native", "native", "native", "native"),
        "float64":         ("native", "native", "native", "native"),
        "bfloat16":        ("native", "native", "native", "native"),
        "float16":         ("native", "native", "native", "native"),
    },
    "group_whiten_eval": {
        "float32":         ("native", "native", "native", "native"),
        "float64":         ("native", "native", "native", "native"),
        "bfloat16":        ("native", "native", "native", "native"),
        "float16":         ("native", "native", "native", "native"),
    },
    "whitening_matrix": {
        "float32":         ("torch", "torch", "torch", "torch"),
        "float64":         ("torch", "torch", "torch", "torch"),
    },
    "topk_mask": {
        "float32":         "native",
        "float64":         "native",
        "bfloat16":        "native",
        "float16":         "native",
    },
}


# the row keys of the dtypes (a dict lookup, which torch.compile traces as a constant)
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def column(d: int) -> int:
    """The index of d's range in :data:`COLUMNS`."""
    for i, bound in enumerate(D_BOUNDS):
        if d <= bound:
            return i
    return len(D_BOUNDS)


def choice(op: str, dtype: torch.dtype, d: int | None = None) -> str | None:
    """The table's backend for ``op`` on CPU tensors of ``dtype`` with group size ``d``; None where
    the table has no entry (an op or dtype it does not list, or d unknown for a row that depends on
    it) or names a backend that does not take this d (:data:`MAX_D`)."""
    op = SAME_ROW.get(op, op)
    row = CHOICE.get(op, {}).get(DTYPE_NAMES.get(dtype))
    if row is None or isinstance(row, str):
        return row
    if d is None:
        return None
    pick = row[column(d)]
    return None if d > MAX_D.get((op, pick), d) else pick


def table() -> dict:
    """The table as plain data: op -> dtype -> {column: backend} (``"any d"`` for rows without d)."""
    out = {}
    for op, rows in CHOICE.items():
        out[op] = {dtype: ({"any d": row} if isinstance(row, str) else dict(zip(COLUMNS, row)))
                   for dtype, row in rows.items()}
    return out
