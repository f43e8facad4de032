"""What the kernel families share: jit helpers, block sizes of the passes over x, layout, the launch.

Notation (see docs/design.md, "Semantics"): x (N, C, *S) is read as (N, C, L), L = prod(S), through
three strides (sn, sc, sl), so contiguous NCHW-style inputs (sl = 1) and channels_last inputs
(sc = 1, sl = C) are both read in place, without a transposed copy. Sample j in [0, m), m = N * L,
is (n, l) = divmod(j, L). Group g holds channels [g*d, (g+1)*d); every kernel works on tiles
[BD, BM] (channels x samples) with BD = next power of two >= d (masked), and accumulates in fp32.

A smaller last group (IterNorm's flexible groups): the kernels take the channel count C, and group g
holds dg = min(d, C - g*d) channels (:func:`_group_size`); loads of x, dy, weight and bias are masked
by dg, so the last group's padding reads as zeros, and its statistics and d x d matrices (G, d[, d])
hold zeros there (written, never left unwritten). The loads of the per-group inputs (mean, the d x d
matrices, v) are masked by dg too: whatever their padding holds is never read. Padded lanes are
selected (masked loads, tl.where), never multiplied by 0, which would keep a NaN or turn an inf into
one. With zero padding and the identity of the group's
own channels, the padding block stays zero and decoupled in every d x d computation (Newton-Schulz,
its backward), so the top-left dg x dg block is exactly the smaller group's own result.

Matrix products use ``tl.dot`` when BD >= 16 and a broadcast-and-sum otherwise (tl.dot needs 16).

Every launcher goes through :func:`launch`, the one place where kernels are wrapped with
``torch.library.wrap_triton`` (traceable by torch.compile / export inside a ``triton_op``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import math

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------------
# jit helpers


@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """a @ b in fp32: tl.dot for dims >= 16, else broadcast-and-sum."""
    if USE_DOT:
        return tl.dot(a, b, input_precision=PREC)
    else:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _group_size(g, d, C):
    """dg: the channels of group g, d but for a smaller last group (C - g d < d)."""
    return tl.minimum(d, C - g * d)


@triton.jit
def _tile(g, j0, d, dg, m, L, sn, sc, sl, BD: tl.constexpr, BM: tl.constexpr):
    """Offsets [BD, BM] (int64) and mask of the samples j0 .. j0+BM of group g (dg channels)."""
    return _tile_rows(g, tl.arange(0, BD), j0, d, dg, m, L, sn, sc, sl, BM)


@triton.jit
def _tile_rows(g, c, j0, d, dg, m, L, sn, sc, sl, BM: tl.constexpr):
    """Offsets [len(c), BM] (int64) and mask of the channels c (of group g, dg channels) of samples
    j0 .. j0+BM."""
    j = j0 + tl.arange(0, BM).to(tl.int64)
    n = j // L
    l = j - n * L
    off = (g * d + c).to(tl.int64)[:, None] * sc + (n * sn + l * sl)[None, :]
    mask = (c < dg)[:, None] & (j < m)[None, :]
    return off, mask


@triton.jit
def _block_range(s, n_blocks, bpp):
    b0 = s.to(tl.int64) * bpp
    b1 = tl.minimum(b0 + bpp, n_blocks)
    return b0, b1


@triton.jit
def _eye(BD: tl.constexpr, d):
    r = tl.arange(0, BD)
    return ((r[:, None] == r[None, :]) & (r < d)[:, None]).to(tl.float32)


@triton.jit
def _scale_exp(a):
    """The exponent e (int32) of a group's power-of-two scale c = 2^e for |x - shift| <= a: the
    smallest e with 2^e > a (up to a factor 2: read from the exponent bits of a, exact, no log2),
    clamped to [0, 126]. e = 0 (no scaling) for a < 1; at most 126 so that 1/c = 2^-126 is a normal
    fp32 number (2^-127 is subnormal, flushed to zero where denormals are), and |x - shift| / c < 4
    for any finite a < 2^128."""
    E = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF                     # a < 2^(E - 126)
    return tl.minimum(tl.maximum(E - 126, 0), 126)


@triton.jit
def _exp2i(e):
    """2^e in fp32, exactly, for an integer e in [-126, 127] (built from the exponent bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _inv_pow2(c):
    """1 / c, exactly, for a power of two c in [1, 2^126] (exponent bits: the division of a GPU's
    fast path may round)."""
    return ((254 << 23) - c.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)


# ---------------------------------------------------------------------------------------------------
# launch configuration


class LaunchConfig:
    """Base of the frozen dataclasses of launch configuration: every field is a constexpr of the
    kernel or a launch option (num_warps, num_stages), by the name the launch takes."""

    def meta(self) -> dict:
        """The fields as keyword arguments of the launch (and of a STATIC_SPECS ``config``)."""
        return dataclasses.asdict(self)


# Output rows per product of the apply / dx kernels above BD = 64 (see ProductPassConfig).
RB_ROWS = 16


def pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class PassConfig(LaunchConfig):
    """BD, BM, USE_DOT, PREC, num_warps, num_stages of the kernels that stream x (grid P x G, tiles
    [BD, BM] of channels x samples) for group size d.

    Chosen from the static compile figures (python -m sdecor_kernels.static) for sm_80 and sm_90: no
    spills, and registers low enough for >= 2 programs of 8 warps per SM up to d = 32.
    num_stages=1: the loops stream x once, and prefetch stages cost registers and shared memory that
    occupancy (many programs per SM) makes up for.
    """

    BD: int
    BM: int
    USE_DOT: bool
    PREC: str
    num_warps: int
    num_stages: int

    @classmethod
    def for_group(cls, d: int, on_gpu: bool):
        BD = max(2, pow2(d))
        use_dot = BD >= 16
        if not use_dot:
            # the broadcast product [BD, BM, BD] kept at <= 4096 elements
            BM, warps = max(16, min(128, 4096 // (BD * BD))), 4
        elif BD <= 16:
            BM, warps = 64, 8
        elif BD <= 32:
            BM, warps = 32, 8
        else:
            # at BD = 64, BM = 32 spills in the dx kernel on sm_80 (255 registers)
            BM, warps = 16, 8
        # fp32 products: FMA ("ieee") keeps up with memory below d = 64 (2d flops per 4-byte element);
        # above it, three tf32 tensor-core products give ~fp32 accuracy. The interpreter's dot is
        # exact fp32 whatever is asked.
        prec = "tf32x3" if (on_gpu and BD >= 64) else "ieee"
        return cls(BD=BD, BM=BM, USE_DOT=use_dot, PREC=prec, num_warps=warps, num_stages=1,
                   **cls.large_d(BD))

    @staticmethod
    def large_d(BD: int) -> dict:
        """The fields a subclass adds, for block size BD."""
        return {}


@dataclass(frozen=True)
class ReducePassConfig(PassConfig):
    """A pass that sums d x d products over the samples (statistics partials, backward reduce): above
    BD = 64 its accumulator is kept as two halves of BD/2 rows (HALVES; the whole one spills at
    BD = 128 on sm_80 and sm_90)."""

    HALVES: bool = False

    @staticmethod
    def large_d(BD: int) -> dict:
        return {"HALVES": BD > 64}


@dataclass(frozen=True)
class ProductPassConfig(PassConfig):
    """A pass that multiplies the samples by d x d matrices (apply, dx): above BD = 64 the matrices
    are reloaded inside the loop (MAT_IN_LOOP) and the product is formed RB = RB_ROWS output rows at
    a time (the whole product spills at BD = 128 on sm_80 and sm_90)."""

    MAT_IN_LOOP: bool = False
    RB: int = 0

    @staticmethod
    def large_d(BD: int) -> dict:
        return {"MAT_IN_LOOP": BD > 64, "RB": BD if BD <= 64 else RB_ROWS}


@dataclass(frozen=True)
class MatrixConfig(LaunchConfig):
    """BD, USE_DOT, PREC, num_warps, num_stages of a kernel with one program per group working on
    d x d matrices (statistics finalize, Newton-Schulz)."""

    BD: int
    USE_DOT: bool
    PREC: str
    num_warps: int
    num_stages: int

    @staticmethod
    def matrix_blocks(d: int) -> dict:
        BD = max(2, pow2(d))
        # d x d products: FMA ("ieee") on every device, whose operands take half the registers of
        # tf32x3's (the flops of one program per group are negligible next to the passes over x)
        return dict(BD=BD, USE_DOT=BD >= 16, PREC="ieee")


def pass_setup(config: type[PassConfig], x: torch.Tensor, L: int, d: int):
    """(cfg, m, n_blocks, P, bpp) of a pass over x (N, C, L) in groups of d: the launch configuration,
    the samples m = N * L, their blocks of cfg.BM, and the split of the blocks over P programs per
    group (see :func:`splits`)."""
    m, dev = x.shape[0] * L, x.device
    cfg = config.for_group(d, dev.type == "cuda")
    n_blocks = -(-m // cfg.BM)
    P, bpp = splits(n_blocks, -(-x.shape[1] // d), dev)
    return cfg, m, n_blocks, P, bpp


def splits(n_blocks: int, G: int, device: torch.device) -> tuple[int, int]:
    """(P, blocks per program): enough programs to fill the device even when G is small."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8
    P = max(1, min(n_blocks, -(-target // G)))
    bpp = -(-n_blocks // P)
    return -(-n_blocks // bpp), bpp


# ---------------------------------------------------------------------------------------------------
# layout and launch


def flat_view(t: torch.Tensor, output_layout: bool = False):
    """(t', sn, sc, sl, L): t (N, C, *S) addressed as (N, C, L) by three strides.

    Any layout whose trailing dims merge into one stride is read in place (contiguous, channels_last,
    expanded gradients); others are copied. With ``output_layout`` t' is also dense (contiguous or
    channels_last), so that ``torch.empty_like(t')`` has the same strides.
    """
    if output_layout and not (t.is_contiguous() or _channels_last(t)):
        t = t.contiguous()
    spatial = [(n, s) for n, s in zip(t.shape[2:], t.stride()[2:]) if n != 1]
    if any(spatial[i][1] != spatial[i + 1][1] * spatial[i + 1][0] for i in range(len(spatial) - 1)):
        t = t.contiguous()
        spatial = [(n, s) for n, s in zip(t.shape[2:], t.stride()[2:]) if n != 1]
    sl = spatial[-1][1] if spatial else 1
    return t, t.stride(0), t.stride(1), sl, math.prod(t.shape[2:])


def _channels_last(t: torch.Tensor) -> bool:
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def _interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(kernel, InterpretedFunction)


def launch(kernel, grid, *args, **meta) -> None:
    """Launch ``kernel[grid](*args, **meta)`` through torch.library.wrap_triton (traceable by
    torch.compile / export inside a triton_op).

    Under the interpreter with fake tensors (shape propagation), no kernel runs.
    """
    if _interpreted(kernel):
        from torch._subclasses.fake_tensor import is_fake

        if any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
            return
    torch.library.wrap_triton(kernel)[grid](*args, **meta)


def f32(*shape, device) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------------
# ahead-of-time compilation specs (see sdecor_kernels.static)

# group sizes compiled by the static report: powers of two, odd sizes, and both sides of the limits
SPEC_DS = (2, 3, 4, 8, 16, 32, 48, 64, 128)
# the half-precision variant of the passes over x: the tensors of the input's dtype in bf16
BF16 = {"x_ptr": "*bf16", "y_ptr": "*bf16", "dy_ptr": "*bf16", "dx_ptr": "*bf16", "weight_ptr": "*bf16",
        "bias_ptr": "*bf16"}
# the arguments of a pass over x: layout of x (and of dy), sample blocks of each program
X_ARGS = "d C m L sn sc sl n_blocks bpp"
XT_ARGS = "d C m L sn sc sl tn tc tl_ n_blocks bpp"


def signature(names: str, types: dict | None = None) -> dict:
    """Signature: *_ptr arguments are fp32 pointers, the rest i32 unless ``types`` says otherwise."""
    types = types or {}
    return {a: types.get(a, "*fp32" if a.endswith("_ptr") else "i32") for a in names.split()}
