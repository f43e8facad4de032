"""Top-k saliency masking kernels: score keys, exact per-row radix select, masked write with fills.

Three launches, all without a host sync (k is a launch argument):

1. ``topk_score_kernel``  grid (N, cdiv(D, BLOCK)): score = sum over R rows of |saliency| (R = C and a
   division by C for reduce="mean", R = 1 for reduce=None), mapped to an order-preserving uint32 key.
2. ``topk_select_kernel`` grid (N,): the k-th smallest key t of each row by radix select (4 passes of
   a 256-bin histogram over 8-bit digits), then one pass in index order that selects every key < t
   and the first (k - count(< t)) keys == t: the k smallest scores, ties by lower flat index.
3. ``topk_fill_kernel``   grid (N * C,): per (sample, channel) row, min / max / sum of x when the fill
   needs them (the row is then read a second time, from cache), then x_masked = where(mask, fill, x).

Keys: the score's float32 bits with the sign bit flipped for positives and every bit inverted for
negatives, so unsigned order is float order; -0.0 is first made +0.0 (they compare equal) and every
NaN maps to 0xFFFFFFFF, above +inf. largest=True inverts the keys (NaN then comes first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import LaunchConfig, launch

__all__ = ["FILL_CODES", "STATIC_SPECS", "TopkConfig", "launch_topk_mask"]

# fill codes (the order of sdecor.reference.FILLS)
FILL_CODES = {"zero": 0, "constant": 1, "mean": 2, "uniform": 3, "baseline": 4}

# 1024 keys per step keeps the select loop at 147 steps per pass for a 3x224x224 row.
SELECT_BLOCK = 1024
SCORE_BLOCK = 1024
FILL_BLOCK = 1024
RADIX_BITS = 8


@triton.jit
def _order_key(score, LARGEST: tl.constexpr):
    """float32 -> uint32 with unsigned order = float order; -0.0 == +0.0; NaN above +inf."""
    score = tl.where(score == 0.0, 0.0, score)                  # -0.0 -> +0.0
    bits = score.to(tl.uint32, bitcast=True)
    sign = tl.full(bits.shape, 0x80000000, tl.uint32)
    ones = tl.full(bits.shape, 0xFFFFFFFF, tl.uint32)          # x ^ ones is ~x
    key = tl.where((bits & sign) != 0, bits ^ ones, bits | sign)
    key = tl.where(score != score, ones, key)
    if LARGEST:
        key = key ^ ones
    return key


@triton.jit
def topk_score_kernel(sal_ptr, key_ptr, R, D, R_f,
                      ABS: tl.constexpr, MEAN: tl.constexpr, LARGEST: tl.constexpr,
                      BLOCK: tl.constexpr):
    # saliency viewed as (N, R, D) contiguous; keys (N, D) int32 holding uint32 bits
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)       # [BLOCK]
    valid = offs < D
    base = sal_ptr + n * R * D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # channels summed in order, then divided by R: the same arithmetic as torch's CPU mean
    for r in range(R):
        v = tl.load(base + r * D + offs, mask=valid, other=0.0).to(tl.float32)
        if ABS:
            v = tl.abs(v)
        acc += v
    if MEAN:
        acc = tl.math.div_rn(acc, tl.full([BLOCK], R_f, tl.float32))
    # the score rounded to the saliency's dtype, as the reference holds it
    acc = acc.to(sal_ptr.dtype.element_ty).to(tl.float32)
    key = _order_key(acc, LARGEST)
    tl.store(key_ptr + n * D + offs, key.to(tl.int32, bitcast=True), mask=valid)


@triton.jit
def topk_select_kernel(key_ptr, mask_ptr, D, k, BLOCK: tl.constexpr):
    # keys (N, D) uint32 bits; mask (N, D) uint8
    row = tl.program_id(0).to(tl.int64)
    kp = key_ptr + row * D
    mp = mask_ptr + row * D
    bins = tl.arange(0, 256)                                    # [256]
    rank = tl.maximum(k, 1)            # 1-based rank of the threshold key t within the row
    prefix = tl.zeros([1], dtype=tl.uint32)
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        hist = tl.zeros([256], dtype=tl.int32)
        for start in range(0, D, BLOCK):
            offs = start + tl.arange(0, BLOCK)                  # [BLOCK]
            valid = offs < D
            key = tl.load(kp + offs, mask=valid, other=0).to(tl.uint32, bitcast=True)
            if p == 0:
                live = valid
            else:
                live = valid & ((key >> (shift + 8)) == prefix)
            digit = ((key >> shift) & 0xFF).to(tl.int32)
            hist += tl.histogram(digit, 256, mask=live)
        cum = tl.cumsum(hist, 0)
        d = tl.sum((cum < rank).to(tl.int32), 0)               # digit holding the rank-th key
        rank -= tl.sum(tl.where(bins < d, hist, 0), 0)
        prefix = (prefix << 8) | d.to(tl.uint32)
    # prefix = t; rank = how many keys equal to t are taken, in index order
    need = tl.where(k > 0, rank, 0)
    seen = tl.zeros([1], dtype=tl.int32)
    for start in range(0, D, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < D
        key = tl.load(kp + offs, mask=valid, other=0).to(tl.uint32, bitcast=True)
        eq = valid & (key == prefix)
        eqi = eq.to(tl.int32)
        order = tl.cumsum(eqi, 0) + seen                        # 1-based rank among keys == t
        sel = (valid & (key < prefix)) | (eq & (order <= need))
        tl.store(mp + offs, sel.to(tl.uint8), mask=valid)
        seen += tl.sum(eqi, 0)


@triton.jit
def topk_fill_kernel(x_ptr, mask_ptr, base_ptr, out_ptr, C, S, S_f, value, seed, call_lo, call_hi,
                     SHARED_MASK: tl.constexpr, FILL: tl.constexpr, BLOCK: tl.constexpr):
    # x, base, out (N*C, S) contiguous; mask (N, S) when SHARED_MASK else (N*C, S), uint8
    pid = tl.program_id(0).to(tl.int64)                         # n * C + c
    row = pid * S
    if SHARED_MASK:
        mrow = (pid // C) * S
    else:
        mrow = row
    lo = 0.0
    hi = 0.0
    mean = 0.0
    if FILL == 2 or FILL == 3:
        # per-sample, per-channel statistics of x over S
        vmin = tl.full([BLOCK], float("inf"), tl.float32)
        vmax = tl.full([BLOCK], float("-inf"), tl.float32)
        vsum = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, S, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < S
            xv = tl.load(x_ptr + row + offs, mask=valid, other=0.0).to(tl.float32)
            vmin = tl.minimum(vmin, tl.where(valid, xv, float("inf")))
            vmax = tl.maximum(vmax, tl.where(valid, xv, float("-inf")))
            vsum += xv
        lo = tl.min(vmin, 0)
        hi = tl.max(vmax, 0)
        mean = tl.sum(vsum, 0) / S_f
    for start in range(0, S, BLOCK):
        offs = start + tl.arange(0, BLOCK)                      # [BLOCK]
        valid = offs < S
        xv = tl.load(x_ptr + row + offs, mask=valid, other=0.0)
        m = tl.load(mask_ptr + mrow + offs, mask=valid, other=0) != 0
        if FILL == 0:
            f = tl.zeros([BLOCK], dtype=tl.float32)
        elif FILL == 1:
            f = tl.full([BLOCK], value, tl.float32)
        elif FILL == 2:
            f = tl.full([BLOCK], mean, tl.float32)
        elif FILL == 3:
            # Philox counter: (flat element index, call id lo, call id hi, 0) under the seed
            c0 = (row + offs).to(tl.uint32)
            c1 = tl.full([BLOCK], call_lo, tl.uint32)
            c2 = tl.full([BLOCK], call_hi, tl.uint32)
            c3 = tl.zeros([BLOCK], dtype=tl.uint32)
            r0, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
            u = tl.uint_to_uniform_float(r0)
            f = tl.minimum(tl.maximum(lo + (hi - lo) * u, lo), hi)
        else:
            f = tl.load(base_ptr + row + offs, mask=valid, other=0.0).to(tl.float32)
        out = tl.where(m, f.to(xv.dtype), xv)
        tl.store(out_ptr + row + offs, out, mask=valid)


# ---------------------------------------------------------------------------------------------------
# launch configuration


@dataclass(frozen=True)
class TopkConfig(LaunchConfig):
    """BLOCK and launch options of one top-k kernel. Fixed for every size: each kernel streams its row
    in steps of BLOCK elements."""

    BLOCK: int
    num_warps: int = 4


SCORE_CONFIG = TopkConfig(BLOCK=SCORE_BLOCK)
SELECT_CONFIG = TopkConfig(BLOCK=SELECT_BLOCK)
FILL_CONFIG = TopkConfig(BLOCK=FILL_BLOCK)


# ---------------------------------------------------------------------------------------------------
# launcher


def launch_topk_mask(x: torch.Tensor, saliency: torch.Tensor, k: int, largest: bool, shared: bool, abs: bool,
                     fill: str, value: float, baseline: torch.Tensor | None, seed: int, call: int):
    """Launch the three kernels on x, saliency (N, C, *S) (and baseline, like x, for fill="baseline").

    shared: reduce="mean" (one mask (N, *S) for all channels); else reduce=None (mask like x).
    k: how many positions of each row are masked; seed, call: the Philox key and counter of
    fill="uniform". Returns (x_masked, mask): x_masked contiguous in x's dtype, mask a bool tensor.
    """
    x = x.contiguous()
    saliency = saliency.contiguous()
    baseline = baseline.to(x.dtype).contiguous() if baseline is not None else None
    N, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    R, D = (C, S) if shared else (1, C * S)
    keys = torch.empty((N, D), dtype=torch.int32, device=x.device)
    mask_u8 = torch.empty((N, D), dtype=torch.uint8, device=x.device)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if N == 0 or D == 0 or C == 0:
        mask = mask_u8.view(torch.bool)
        return out, mask.reshape(((N,) + tuple(x.shape[2:])) if shared else x.shape)
    launch(topk_score_kernel, (N, triton.cdiv(D, SCORE_CONFIG.BLOCK)), saliency, keys, R, D, float(R),
           ABS=bool(abs), MEAN=bool(shared), LARGEST=bool(largest), **SCORE_CONFIG.meta())
    launch(topk_select_kernel, (N,), keys, mask_u8, D, k, **SELECT_CONFIG.meta())
    fill_code = FILL_CODES[fill]
    base = baseline if fill_code == 4 else x
    launch(topk_fill_kernel, (N * C,), x, mask_u8, base, out, C, S, float(S), float(value), seed,
           call & 0xFFFFFFFF, (call >> 32) & 0xFFFFFFFF, SHARED_MASK=bool(shared), FILL=fill_code,
           **FILL_CONFIG.meta())
    mask = mask_u8.view(torch.bool)
    return out, mask.reshape(((N,) + tuple(x.shape[2:])) if shared else x.shape)


# Ahead-of-time compile specs (sdecor_kernels.static); ``d`` is not used (the blocks are fixed):
# every fill and mask layout in fp32, and the half-precision variants of the default options.
def _score_spec(dtype, mean, largest):
    return dict(name=f"topk_score_kernel[{dtype},{'mean' if mean else 'none'},"
                     f"{'largest' if largest else 'smallest'}]",
                kernel=topk_score_kernel,
                signature={"sal_ptr": f"*{dtype}", "key_ptr": "*i32", "R": "i32", "D": "i32",
                           "R_f": "fp32"},
                config=lambda d: dict(SCORE_CONFIG.meta(), ABS=True, MEAN=mean, LARGEST=largest))


def _fill_spec(dtype, fill, shared):
    return dict(name=f"topk_fill_kernel[{dtype},{fill},{'shared' if shared else 'per_element'}]",
                kernel=topk_fill_kernel,
                signature={"x_ptr": f"*{dtype}", "mask_ptr": "*u8", "base_ptr": f"*{dtype}",
                           "out_ptr": f"*{dtype}", "C": "i32", "S": "i32", "S_f": "fp32",
                           "value": "fp32", "seed": "i64", "call_lo": "i64", "call_hi": "i64"},
                config=lambda d: dict(FILL_CONFIG.meta(), SHARED_MASK=shared, FILL=FILL_CODES[fill]))


STATIC_SPECS = [
    *[_score_spec("fp32", mean, largest) for mean in (True, False) for largest in (False, True)],
    _score_spec("fp16", True, False),
    _score_spec("bf16", True, False),
    dict(name="topk_select_kernel", kernel=topk_select_kernel,
         signature={"key_ptr": "*i32", "mask_ptr": "*u8", "D": "i32", "k": "i32"},
         config=lambda d: SELECT_CONFIG.meta()),
    *[_fill_spec("fp32", fill, shared) for fill in FILL_CODES for shared in (True, False)],
    _fill_spec("fp16", "uniform", True),
    _fill_spec("bf16", "uniform", True),
]
