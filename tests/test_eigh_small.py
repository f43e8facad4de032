"""torch.ops.sdecor.eigh_small: the batched Jacobi eigensolver of csrc/jacobi.h.

CPU tests run the CPU twin (the same phases as the CUDA kernel, run by a team of one); the GPU test
compares the CUDA kernel with it. Oracle: torch.linalg.eigh in float64.
"""

import pytest
import torch

from sdecor import _ext, _native

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"sdecor._C is not built: {_ext.error()}")

DTYPES = [torch.float32, torch.float64]
DIMS = [1, 2, 3, 16, 33, 64, 128]
KINDS = ["randn", "cov", "badly_scaled", "repeated", "rank_deficient", "huge", "tiny"]

# Error bounds in units of u = max(d, 8) * eps (machine epsilon of the dtype); eigenvalue and
# reconstruction errors are relative to ||A||_2. A backward-stable solver has errors of O(d eps); the
# solver measured at most 0.15 u (eigenvalues), 2.8 u (orthogonality), 1.4 u (reconstruction) over
# these matrices, so the bounds leave about 3x.
EIG_U, ORTH_U, REC_U = 2.0, 8.0, 4.0


def _unit(d, dtype):
    return max(d, 8) * torch.finfo(dtype).eps


def make(kind, batch, d, dtype, gen):
    """A batch of symmetric matrices of one kind, built in float64 and rounded to dtype."""
    f64 = torch.float64
    q = torch.linalg.qr(torch.randn(batch, d, d, dtype=f64, generator=gen))[0]
    if kind == "randn":
        a = torch.randn(batch, d, d, dtype=f64, generator=gen)
        a = (a + a.mT) / 2
    elif kind == "cov":  # what whitening feeds it: X X^T / m
        x = torch.randn(batch, d, 3 * d + 1, dtype=f64, generator=gen)
        a = x @ x.mT / x.shape[-1]
    elif kind == "badly_scaled":  # eigenvalues over 12 decades
        lam = torch.logspace(-6, 6, d, dtype=f64).expand(batch, d)
        a = q @ torch.diag_embed(lam) @ q.mT
    elif kind == "repeated":  # two eigenvalues, each repeated ~d/2 times
        lam = torch.ones(batch, d, dtype=f64)
        lam[:, : d // 2] = 2.0
        a = q @ torch.diag_embed(lam) @ q.mT
    elif kind == "rank_deficient":  # rank ~d/3
        x = torch.randn(batch, d, max(1, d // 3), dtype=f64, generator=gen)
        a = x @ x.mT
    elif kind == "huge":  # entries near 1e30: sums of squares would overflow in float32 unscaled
        a = torch.randn(batch, d, d, dtype=f64, generator=gen)
        a = (a + a.mT) * 1e30
    elif kind == "tiny":  # entries near 1e-30: squares would underflow in float32 unscaled
        a = torch.randn(batch, d, d, dtype=f64, generator=gen)
        a = (a + a.mT) * 1e-30
    else:
        raise AssertionError(kind)
    return ((a + a.mT) / 2).to(dtype)


def check_decomposition(a, lam, vec, dtype=None):
    """Eigenvalues against float64 eigh, orthogonality, reconstruction; all per matrix."""
    dtype = dtype or a.dtype
    d = a.shape[-1]
    u = _unit(d, dtype)
    assert lam.shape == a.shape[:-1] and vec.shape == a.shape
    assert lam.dtype == a.dtype and vec.dtype == a.dtype
    a64, lam64, vec64 = a.double().cpu(), lam.double().cpu(), vec.double().cpu()
    ref = torch.linalg.eigvalsh(a64)
    norm = torch.linalg.matrix_norm(a64, ord=2)[..., None]
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    assert torch.all(lam64[..., 1:] >= lam64[..., :-1]), "eigenvalues are not ascending"
    eig_err = ((lam64 - ref).abs() / norm).amax() / u
    eye = torch.eye(d, dtype=torch.float64)
    orth_err = (vec64.mT @ vec64 - eye).abs().amax() / u
    rec = vec64 @ torch.diag_embed(lam64) @ vec64.mT
    rec_err = ((rec - a64).abs() / norm[..., None]).amax() / u
    assert eig_err <= EIG_U, f"eigenvalue error {eig_err:.2f} u > {EIG_U} u"
    assert orth_err <= ORTH_U, f"||U^T U - I||_max = {orth_err:.2f} u > {ORTH_U} u"
    assert rec_err <= REC_U, f"||U diag(L) U^T - A||_max / ||A||_2 = {rec_err:.2f} u > {REC_U} u"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_against_eigh(dtype, d, kind):
    # fp64 at d = 128 keeps V outside the work area (the layout the GPU uses when A and V exceed
    # shared memory); every other case keeps it inside: both layouts run here.
    batch = 2 if d >= 64 else 5
    a = make(kind, batch, d, dtype, _gen(d))
    lam, vec = _native.eigh_small(a)
    check_decomposition(a, lam, vec)


@pytest.mark.parametrize("batch,d", [(1, 16), (4096, 2), (4096, 3), (4096, 16), (300, 33)],
                         ids=lambda v: str(v))
def test_batch_sizes(batch, d):
    a = make("cov", batch, d, torch.float32, _gen(batch))
    lam, vec = torch.ops.sdecor.eigh_small(a)
    check_decomposition(a, lam, vec)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eigenvectors_match_eigh_up_to_sign(dtype):
    # Well separated eigenvalues (gap 1 against ||A|| = 16): eigenvectors are determined up to sign.
    d, gen = 16, _gen(1)
    q = torch.linalg.qr(torch.randn(8, d, d, dtype=torch.float64, generator=gen))[0]
    lam = torch.arange(1, d + 1, dtype=torch.float64).expand(8, d)
    a = (q @ torch.diag_embed(lam) @ q.mT).to(dtype)
    a = (a + a.mT) / 2
    ref_lam, ref_vec = torch.linalg.eigh(a.double())
    got_lam, got_vec = _native.eigh_small(a)
    overlap = (got_vec.double().mT @ ref_vec).diagonal(dim1=-2, dim2=-1).abs()
    tol = 100 * d * torch.finfo(dtype).eps
    assert (overlap - 1).abs().amax() <= tol
    assert (got_lam.double() - ref_lam).abs().amax() <= tol * d


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 5, 16], ids=lambda d: f"d{d}")
def test_identity_and_diagonal_are_exact(dtype, d):
    eye = torch.eye(d, dtype=dtype).expand(3, d, d)
    lam, vec = _native.eigh_small(eye)
    assert torch.equal(lam, torch.ones(3, d, dtype=dtype))
    assert torch.equal(vec, eye)
    # a diagonal matrix needs no rotation: its entries come back sorted, the eigenvectors permuted
    diag = torch.randperm(d, generator=_gen(d)).to(dtype) - d / 2
    lam, vec = _native.eigh_small(torch.diag(diag))
    order = torch.argsort(diag, stable=True)
    assert torch.equal(lam, diag[order])
    assert torch.equal(vec, torch.eye(d, dtype=dtype)[:, order])


def test_zero_matrix():
    lam, vec = _native.eigh_small(torch.zeros(2, 7, 7))
    assert torch.equal(lam, torch.zeros(2, 7))
    assert torch.equal(vec, torch.eye(7).expand(2, 7, 7))


def test_shapes_strides_and_empty_batch():
    gen = _gen(3)
    a = make("randn", 6, 5, torch.float64, gen).reshape(2, 3, 5, 5)
    lam, vec = _native.eigh_small(a)
    assert lam.shape == (2, 3, 5) and vec.shape == (2, 3, 5, 5)
    flat_lam, flat_vec = _native.eigh_small(a.reshape(6, 5, 5))
    assert torch.equal(lam.reshape(6, 5), flat_lam) and torch.equal(vec.reshape(6, 5, 5), flat_vec)
    # a non-contiguous batch gives the same results as its contiguous copy
    strided = a.transpose(0, 1)
    assert not strided.is_contiguous()
    s_lam, s_vec = _native.eigh_small(strided)
    c_lam, c_vec = _native.eigh_small(strided.contiguous())
    assert torch.equal(s_lam, c_lam) and torch.equal(s_vec, c_vec)
    # a single matrix and an empty batch
    lam1, vec1 = _native.eigh_small(a[0, 0])
    assert lam1.shape == (5,) and vec1.shape == (5, 5)
    lam0, vec0 = _native.eigh_small(torch.empty(0, 5, 5))
    assert lam0.shape == (0, 5) and vec0.shape == (0, 5, 5)


def test_reads_the_lower_triangle():
    a = make("randn", 4, 9, torch.float64, _gen(4))
    messy = a.clone()
    iu = torch.triu_indices(9, 9, offset=1)
    messy[:, iu[0], iu[1]] = torch.randn(4, iu.shape[1], dtype=torch.float64, generator=_gen(5))
    lam, vec = _native.eigh_small(messy, check=False)
    ref_lam, ref_vec = _native.eigh_small(a)
    assert torch.equal(lam, ref_lam) and torch.equal(vec, ref_vec)
    assert torch.equal(torch.ops.sdecor.eigh_small(messy)[0], ref_lam)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=str)
def test_non_finite_input_gives_nan(bad):
    a = make("randn", 4, 6, torch.float32, _gen(6))
    a[1, 3, 2] = a[1, 2, 3] = bad  # off-diagonal
    a[2, 4, 4] = bad  # diagonal
    lam, vec = _native.eigh_small(a)
    for i in (1, 2):
        assert torch.isnan(lam[i]).all() and torch.isnan(vec[i]).all()
    check_decomposition(a[[0, 3]], lam[[0, 3]], vec[[0, 3]])


def test_rejects_non_symmetric_input():
    a = make("randn", 3, 6, torch.float32, _gen(7))
    a[2, 0, 5] += 0.5
    with pytest.raises(ValueError, match=r"a must be symmetric: matrix 2 of the batch"):
        _native.eigh_small(a)
    # rounding-level asymmetry (as a GEMM-built covariance has) is accepted
    b = make("cov", 3, 6, torch.float32, _gen(8))
    b[0, 0, 5] = b[0, 5, 0] * (1 + 4 * torch.finfo(torch.float32).eps)
    _native.eigh_small(b)


@pytest.mark.parametrize("bad,exc,match", [
    ([[1.0, 0.0], [0.0, 1.0]], TypeError, "must be a torch.Tensor"),
    (torch.eye(3, dtype=torch.int64), TypeError, "float32 or float64"),
    (torch.eye(3, dtype=torch.float16), TypeError, "float32 or float64"),
    (torch.ones(3), ValueError, r"shape \(\.\.\., d, d\)"),
    (torch.ones(2, 3, 4), ValueError, r"shape \(\.\.\., d, d\)"),
    (torch.eye(129), ValueError, "1 <= d <= 128"),
    (torch.empty(2, 0, 0), ValueError, "1 <= d <= 128"),
], ids=["list", "int64", "float16", "1d", "non_square", "d129", "d0"])
def test_bad_input_is_rejected_by_the_wrapper(bad, exc, match):
    with pytest.raises(exc, match=match):
        _native.eigh_small(bad)


@pytest.mark.parametrize("bad,match", [
    (torch.eye(129), r"d must be in \[1, 128\]"),
    (torch.ones(2, 3, 4), "square"),
    (torch.eye(3, dtype=torch.int32), "float32 or float64"),
], ids=["d129", "non_square", "int32"])
def test_bad_input_is_rejected_by_the_op(bad, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sdecor.eigh_small(bad)


def test_no_autograd():
    a = make("cov", 2, 4, torch.float64, _gen(9)).requires_grad_()
    lam, vec = _native.eigh_small(a)  # the wrapper detaches
    assert not lam.requires_grad and not vec.requires_grad
    lam, vec = torch.ops.sdecor.eigh_small(a)  # the op itself refuses to backpropagate
    with pytest.raises(RuntimeError, match="not implemented"):
        (lam.sum() + vec.sum()).backward()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 5), (2, 2, 4, 4), (1, 1)], ids=str)
def test_opcheck(dtype, shape):
    a = torch.randn(shape, dtype=dtype, generator=_gen(10))
    a = (a + a.mT) / 2
    torch.library.opcheck(torch.ops.sdecor.eigh_small.default, (a,))


@pytest.mark.parametrize("call", ["op", "wrapper"])
def test_compile_fullgraph(call):
    if call == "op":
        fn = lambda x: torch.ops.sdecor.eigh_small(x)  # noqa: E731
    else:
        fn = lambda x: _native.eigh_small(x, check=False)  # noqa: E731
    fn = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for batch, d in [(3, 5), (4, 7)]:
        a = make("cov", batch, d, torch.float64, _gen(batch))
        lam, vec = fn(a)
        ref_lam, ref_vec = torch.ops.sdecor.eigh_small(a)
        assert torch.equal(lam, ref_lam) and torch.equal(vec, ref_vec)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d,batch", [(2, 4096), (3, 1000), (16, 1024), (33, 64), (64, 16), (128, 4)],
                         ids=lambda v: str(v))
def test_cuda_matches_cpu_twin(dtype, d, batch):
    if not _ext.has_cuda():
        pytest.skip("sdecor._C was built without its CUDA part")
    a = make("cov", batch, d, dtype, _gen(d))
    cpu_lam, cpu_vec = torch.ops.sdecor.eigh_small(a)
    a_gpu = a.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the op must not synchronise with the host
    try:
        gpu_lam, gpu_vec = torch.ops.sdecor.eigh_small(a_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    gpu_lam, gpu_vec = gpu_lam.cpu(), gpu_vec.cpu()
    check_decomposition(a, gpu_lam, gpu_vec)
    # Same phases, same arithmetic up to FMA contraction on the GPU: eigenvalues agree to the error
    # bound and eigenvectors of eigenvalues separated by more than that bound agree up to sign.
    u = _unit(d, dtype)
    norm = torch.linalg.matrix_norm(a.double(), ord=2)[..., None]
    assert ((gpu_lam.double() - cpu_lam.double()).abs() / norm).amax() <= 2 * EIG_U * u
    gap = torch.minimum(
        torch.cat([cpu_lam[..., 1:] - cpu_lam[..., :-1], torch.full_like(cpu_lam[..., :1], float("inf"))], -1),
        torch.cat([torch.full_like(cpu_lam[..., :1], float("inf")), cpu_lam[..., 1:] - cpu_lam[..., :-1]], -1))
    separated = gap.double() > 1e3 * u * norm
    overlap = (gpu_vec.double().mT @ cpu_vec.double()).diagonal(dim1=-2, dim2=-1).abs()
    assert ((overlap - 1).abs() <= 1e-2)[separated].all()
