"""What the benchmark runs for each op: inputs, the reference, fast paths, baselines, bytes floor.

Every implementation of an op is an :class:`Impl` whose ``build(inputs)`` returns a
:class:`Prepared`: a zero-argument ``forward`` returning the op's outputs as a tuple, and the
``leaves`` whose gradients are compared (and cleared between timed calls). Fast paths are the public
sdecor functions and modules with one backend forced; a backend that cannot run the op raises
:class:`~sdecor.BackendUnavailableError` when first called and is reported as skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ... import _backend, _native
from ... import reference as ref
from ...nn import GroupWhitening
from . import baselines as bl
from .baselines import Unavailable
from .shapes import numel

MODES = ("fwd", "bwd", "fwdbwd")
BASELINES = ("reference", "compile", "batchnorm", "iternorm", "iternorm-compile", "floor", "clone", "sgt", "eigh")


@dataclass
class Prepared:
    forward: Callable[[], tuple]
    leaves: list = field(default_factory=list)


@dataclass
class Impl:
    name: str                     # "sdecor[triton]", "reference", "compile", ...
    kind: str                     # "fast" or "baseline"
    build: Callable[[dict], Prepared]
    same: bool = True             # computes the reference's function: checked before timing
    backend: str | None = None
    note: str = ""


def _forced(fn, backend):
    def run(*args, **kwargs):
        with _backend.use_backend(backend):
            return fn(*args, **kwargs)
    return run


def _tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _compiled(fn):
    """torch.compile of a reference function, from a clean compiler state (no recompile limit hit).

    Donated buffers are turned off (process-wide): the ``bwd`` mode runs backward repeatedly on one
    retained graph, which a compiled backward that donates its saved buffers refuses.
    """
    torch._dynamo.reset()
    torch._functorch.config.donated_buffer = False
    return torch.compile(fn, dynamic=False)


def _spd(G: int, d: int, device, gen, m: int | None = None) -> torch.Tensor:
    """G covariance matrices of correlated data (m samples, default 8 d), float32."""
    m = m or 8 * d
    mix = torch.eye(d, dtype=torch.float64) + 0.5 * torch.randn(G, d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    z = mix @ torch.randn(G, d, m, generator=gen, dtype=torch.float64)
    zc = z - z.mean(-1, keepdim=True)
    return (zc @ zc.transpose(-1, -2) / m).to(torch.float32).to(device)


class Op:
    name = ""
    modes = MODES
    dtypes = ("float32", "float16", "bfloat16")
    grad_inputs: tuple = ()       # input keys that require grad (differentiable ops)

    def inputs(self, e: dict, dtype: torch.dtype, device, gen) -> dict:
        raise NotImplementedError

    def reference(self, e: dict) -> Callable:
        """fn(**inputs) -> tuple of outputs: the definition of correct."""
        raise NotImplementedError

    def public(self, e: dict) -> Callable | None:
        """fn(**inputs) through sdecor's public API (dispatching on the forced backend)."""
        return None

    def extra_fast(self, e: dict, device) -> list[Impl]:
        return []

    def extra_baselines(self, e: dict) -> list[Impl]:
        return []

    def has_compile(self, e: dict) -> bool:
        return True

    def canon(self, outs: tuple, e: dict) -> tuple:
        """Outputs in the form compared against the reference."""
        return outs

    def diff_outputs(self, outs: tuple) -> tuple:
        return outs

    def bytes(self, e: dict, dtype: torch.dtype, mode: str) -> int:
        raise NotImplementedError

    def flops(self, e: dict, mode: str) -> int | None:
        """The floating-point operations of the flop floor of this mode (None: no floor)."""
        return None

    # -- assembled lists ---------------------------------------------------------------------------

    def reference_impl(self, e: dict) -> Impl:
        fn = self.reference(e)
        return Impl("reference", "baseline", lambda inp: Prepared(lambda: _tuple(fn(**inp)), self._leaves(inp)))

    def fast_paths(self, e: dict, device) -> list[Impl]:
        fn = self.public(e)
        out = [] if fn is None else [self._public_impl(fn, b) for b in _backend.BACKENDS]
        return out + self.extra_fast(e, device)

    def _public_impl(self, fn, backend: str) -> Impl:
        run = _forced(fn, backend)

        def build(inp):
            return Prepared(lambda: _tuple(run(**inp)), self._leaves(inp))
        return Impl(f"sdecor[{backend}]", "fast", build, backend=backend)

    def baselines(self, e: dict) -> list[Impl]:
        out = [self.reference_impl(e)]
        if self.has_compile(e):
            fn = self.reference(e)

            def build(inp):
                compiled = _compiled(fn)
                return Prepared(lambda: _tuple(compiled(**inp)), self._leaves(inp))
            out.append(Impl("compile", "baseline", build, note="torch.compile(reference)"))
        return out + self.extra_baselines(e)

    def _leaves(self, inp: dict) -> list:
        return [inp[k] for k in self.grad_inputs]


def _xbytes(e: dict, dtype: torch.dtype) -> int:
    return numel(e) * torch.empty((), dtype=dtype).element_size()


def _x(e, dtype, device, gen):
    x = torch.randn((e["N"], e["C"], *e["S"]), generator=gen, dtype=torch.float32)
    # channels with distinct scales and offsets, like real activations
    shape = (1, e["C"]) + (1,) * len(e["S"])
    scale = torch.rand(shape, generator=gen) + 0.5
    shift = 0.5 * torch.randn(shape, generator=gen)
    return (x * scale + shift).to(dtype).to(device)


class GroupCov(Op):
    name = "group_cov"
    grad_inputs = ("x",)

    def inputs(self, e, dtype, device, gen):
        return {"x": _x(e, dtype, device, gen)}

    def reference(self, e):
        return lambda x: ref.group_cov(x, e["d"])

    def public(self, e):
        import sdecor
        return lambda x: sdecor.group_cov(x, e["d"])

    def extra_baselines(self, e):
        return [Impl("clone", "baseline", lambda inp: Prepared(lambda: (inp["x"].clone(),), [inp["x"]]), same=False,
                     note="x.clone(): one read and one write of x, the memory yardstick of a pass over x")]

    def bytes(self, e, dtype, mode):
        # forward reads x once; backward reads x and writes dx (the d x d statistics are negligible)
        X = _xbytes(e, dtype)
        G = e["C"] // e["d"]
        stats = 4 * G * e["d"] * (e["d"] + 1)
        return {"fwd": X + stats, "bwd": 2 * X + stats, "fwdbwd": 3 * X + 2 * stats}[mode]


class WhiteningMatrix(Op):
    name = "whitening_matrix"
    dtypes = ("float32",)          # covariances are float32 for every input dtype
    grad_inputs = ("cov",)

    def inputs(self, e, dtype, device, gen):
        return {"cov": _spd(e["G"], e["d"], device, gen).to(dtype)}

    def reference(self, e):
        return lambda cov: ref.whitening_matrix(cov, e["method"], 1e-5, e["T"])

    def public(self, e):
        import sdecor
        return lambda cov: sdecor.whitening_matrix(cov, e["method"], 1e-5, e["T"])

    def bytes(self, e, dtype, mode):
        M = 4 * e["G"] * e["d"] * e["d"]
        # forward: read cov, write W; backward: read dW and one saved d x d factor, write dcov
        return {"fwd": 2 * M, "bwd": 3 * M, "fwdbwd": 5 * M}[mode]


def _norm_module(C: int, dim: int, affine: bool):
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[dim]
    return cls(C, affine=affine)


class GroupWhiten(Op):
    name = "group_whiten"
    grad_inputs = ("x",)

    def inputs(self, e, dtype, device, gen):
        return {"x": _x(e, dtype, device, gen)}

    def reference(self, e):
        return lambda x: ref.group_whiten(x, e["d"], e["method"], 1e-5, e["T"])

    def public(self, e):
        import sdecor
        return lambda x: sdecor.group_whiten(x, e["d"], e["method"], 1e-5, e["T"])

    def extra_baselines(self, e):
        out = [Impl("batchnorm", "baseline", self._batchnorm, same=False,
                    note="torch.nn.BatchNorm (per-channel standardisation, not whitening)")]
        if e["method"] == "newton":
            out.append(Impl("iternorm", "baseline",
                            lambda inp: Prepared(lambda: (bl.iternorm(inp["x"], e["d"], e["T"], 1e-5),), [inp["x"]]),
                            note="IterNorm as published (naive)"))
        return out

    def _batchnorm(self, inp):
        x = inp["x"]
        bn = _norm_module(x.shape[1], x.dim(), affine=False).to(x.device).train()
        return Prepared(lambda: (bn(x),), [x])

    def bytes(self, e, dtype, mode):
        # DESIGN: forward = stats pass + apply pass (read x twice, write y); backward = 2 reads of
        # (dy, x) + 1 write of dx
        X = _xbytes(e, dtype)
        return {"fwd": 3 * X, "bwd": 5 * X, "fwdbwd": 8 * X}[mode]


# products of d x d by d x m matrices in one GroupWhitening call, per group: forward Xc Xc^T and
# W Xc; backward dY Xc^T, W^T dY and (dSigma + dSigma^T) Xc
FLOOR_PRODUCTS = {"fwd": 2, "bwd": 3, "fwdbwd": 5}


def floor_flops(e: dict, mode: str) -> int:
    """Flops of the d x d x m products of a GroupWhitening call: 2 d^2 m each, for each of G groups
    (m = N * prod(S), G = C / d); a training step (fwdbwd) has five."""
    m = e["N"] * math.prod(e["S"])
    return FLOOR_PRODUCTS[mode] * 2 * e["d"] ** 2 * m * (e["C"] // e["d"])


class GroupWhiteningModule(GroupWhiten):
    """sdecor.nn.GroupWhitening against BatchNorm and IterNorm: training steps, or (entries with
    ``eval=True``) the eval-mode forward under torch.no_grad with running statistics of one training
    step (the reference's batch statistics, momentum 0.1, loaded into every GroupWhitening; BatchNorm
    takes one training step of its own on the same batch)."""

    name = "GroupWhitening"
    grad_inputs = ("x", "weight", "bias")
    momentum = 0.1

    def inputs(self, e, dtype, device, gen):
        C = e["C"]
        inp = {"x": _x(e, dtype, device, gen),
               "weight": (1.0 + 0.1 * torch.randn(C, generator=gen)).to(device),
               "bias": (0.1 * torch.randn(C, generator=gen)).to(device)}
        if e.get("eval"):
            mean, cov = ref.group_cov(inp["x"].float(), e["d"])
            wm = ref.whitening_matrix(cov, e["method"], 1e-5, e["T"])
            eye = torch.eye(e["d"], device=device).expand_as(wm)
            inp["running_mean"] = (self.momentum * mean).unsqueeze(-1)      # from 0
            inp["running_wm"] = torch.lerp(eye, wm, self.momentum)          # from the identity
        return inp

    def reference(self, e):
        def affine(y, x, weight, bias):
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return (y * weight.view(shape) + bias.view(shape)).to(x.dtype)

        if e.get("eval"):
            def fn_eval(x, weight, bias, running_mean, running_wm):
                with torch.no_grad():
                    y = ref.apply_whitening(x.float(), running_mean.squeeze(-1), running_wm)
                    return affine(y, x, weight, bias)
            return fn_eval

        def fn(x, weight, bias):
            return affine(ref.group_whiten(x.float(), e["d"], e["method"], 1e-5, e["T"]), x, weight, bias)
        return fn

    def public(self, e):
        return None

    def flops(self, e, mode):
        return floor_flops(e, mode) if e.get("flop_floor") and not e.get("eval") else None

    def bytes(self, e, dtype, mode):
        if e.get("eval"):
            return 2 * _xbytes(e, dtype)          # read x, write y: the statistics are given
        return super().bytes(e, dtype, mode)

    def _module(self, inp, make, e=None):
        x = inp["x"]
        mod = make(x.shape[1]).to(x.device).train()
        with torch.no_grad():
            mod.weight.copy_(inp["weight"])
            mod.bias.copy_(inp["bias"])
            if e is not None and e.get("eval"):
                mod.running_mean.copy_(inp["running_mean"])
                mod.running_wm.copy_(inp["running_wm"])
                mod.num_batches_tracked.fill_(1)
        return mod.eval() if e is not None and e.get("eval") else mod

    @staticmethod
    def _call(run, x, e):
        if e.get("eval"):
            def forward():
                with torch.no_grad():
                    return (run(x),)
            return forward
        return lambda: (run(x),)

    def extra_fast(self, e, device):
        out = []
        for b in _backend.BACKENDS:
            def build(inp, b=b):
                mod = self._module(inp, lambda C: GroupWhitening(C, num_channels=e["d"], method=e["method"], T=e["T"],
                                                                 eps=1e-5, momentum=self.momentum), e)
                return Prepared(self._call(_forced(mod, b), inp["x"], e), [inp["x"], mod.weight, mod.bias])
            note = "sdecor.nn.GroupWhitening" + (" in eval mode, under torch.no_grad" if e.get("eval") else "")
            out.append(Impl(f"sdecor[{b}]", "fast", build, backend=b, note=note))
        return out

    def extra_baselines(self, e):
        def batchnorm(inp):
            x = inp["x"]
            mod = self._module(inp, lambda C: _norm_module(C, x.dim(), affine=True))
            if e.get("eval"):
                with torch.no_grad():
                    mod(x)                      # one training step: the running statistics
                mod.eval()
            return Prepared(self._call(mod, x, e), [x, mod.weight, mod.bias])
        if e.get("eval"):
            return [Impl("batchnorm", "baseline", batchnorm, same=False,
                         note="torch.nn.BatchNorm in eval mode after one training step, under torch.no_grad")]
        out = [Impl("batchnorm", "baseline", batchnorm, same=False,
                    note="torch.nn.BatchNorm (per-channel standardisation, not whitening)")]
        if e["method"] == "newton":
            def iternorm(inp):
                x, w, b = inp["x"], inp["weight"], inp["bias"]
                return Prepared(lambda: (bl.iternorm(x, e["d"], e["T"], 1e-5, w, b),), [x, w, b])
            out.append(Impl("iternorm", "baseline", iternorm, note="IterNorm as published (naive), with affine"))
            if e.get("compiled_iternorm"):
                def iternorm_compiled(inp):
                    x, w, b = inp["x"], inp["weight"], inp["bias"]
                    fn = bl.compiled_iternorm()
                    return Prepared(lambda: (fn(x, e["d"], e["T"], 1e-5, w, b),), [x, w, b])
                out.append(Impl("iternorm-compile", "baseline", iternorm_compiled,
                                note="torch.compile of the naive IterNorm, with affine (compiled before timing)"))
        return out


class TopkMask(Op):
    name = "topk_mask"
    modes = ("fwd",)

    def inputs(self, e, dtype, device, gen):
        x = _x(e, dtype, device, gen)
        sal = torch.randn(x.shape, generator=gen).to(dtype).to(device)
        return {"x": x, "saliency": sal}

    def _kwargs(self, e):
        return dict(ratio=e["ratio"], reduce=e["reduce"], fill=e["fill"])

    def canon(self, outs, e):
        # random fills differ between generators: compare the mask and every position left unmasked
        x_masked, mask = outs
        if e["fill"] != "uniform":
            return outs
        where = mask.unsqueeze(1) if e["reduce"] == "mean" else mask
        return x_masked.masked_fill(where, 0), mask

    def reference(self, e):
        return lambda x, saliency: ref.topk_mask(x, saliency, **self._kwargs(e))

    def public(self, e):
        import sdecor
        return lambda x, saliency: sdecor.topk_mask(x, saliency, **self._kwargs(e))

    def extra_baselines(self, e):
        D = math.prod(e["S"]) * (1 if e["reduce"] == "mean" else e["C"])
        k = int(math.floor(e["ratio"] * D))
        return [Impl("sgt", "baseline",
                     lambda inp: Prepared(lambda: bl.sgt_mask(inp["x"], inp["saliency"], k, e["reduce"], e["fill"])),
                     note="Saliency Guided Training masking in torch: per-sample topk, scatter, per-channel fill, where")]

    def bytes(self, e, dtype, mode):
        # read x and saliency, write x_masked and the bool mask
        X = _xbytes(e, dtype)
        mask = numel(e) // (e["C"] if e["reduce"] == "mean" else 1)
        return 3 * X + mask


class DecorrelationLoss(Op):
    name = "decorrelation_loss"
    grad_inputs = ("x",)

    def inputs(self, e, dtype, device, gen):
        return {"x": _x(e, dtype, device, gen)}

    def reference(self, e):
        return lambda x: ref.decorrelation_loss(x, e["d"], e["kind"])

    def public(self, e):
        import sdecor
        return lambda x: sdecor.decorrelation_loss(x, e["d"], e["kind"])

    def bytes(self, e, dtype, mode):
        # like group_cov: forward reads x once, backward reads x and writes dx
        X = _xbytes(e, dtype)
        return {"fwd": X, "bwd": 2 * X, "fwdbwd": 3 * X}[mode]


class EighSmall(Op):
    name = "eigh_small"
    modes = ("fwd",)
    dtypes = ("float32",)

    def inputs(self, e, dtype, device, gen):
        return {"a": _spd(e["G"], e["d"], device, gen, e.get("m")).to(dtype)}

    def reference(self, e):
        return lambda a: torch.linalg.eigh(a)

    def has_compile(self, e):
        return False            # eigh is an external LAPACK / cuSOLVER call for the compiler

    def reference_impl(self, e):
        impl = super().reference_impl(e)
        impl.name, impl.note = "eigh", "torch.linalg.eigh (the reference)"
        return impl

    def extra_fast(self, e, device):
        def build(inp):
            why = _backend.native_reason(inp["a"].device)
            if why is not None:
                raise _backend.BackendUnavailableError(why)
            return Prepared(lambda: _tuple(_native.eigh_small(inp["a"])))
        return [Impl("sdecor[native]", "fast", build, backend="native", note="torch.ops.sdecor.eigh_small")]

    def canon(self, outs, e):
        # eigenvectors are unique only up to sign: compare eigenvalues, U diag(l) U^T and U^T U
        evals, evecs = outs[0], outs[1]
        recon = (evecs * evals.unsqueeze(-2)) @ evecs.transpose(-1, -2)
        return evals, recon, evecs.transpose(-1, -2) @ evecs

    def bytes(self, e, dtype, mode):
        G, d = e["G"], e["d"]
        return 4 * (2 * G * d * d + G * d)


OP_SPECS = {op.name: op for op in (GroupCov(), WhiteningMatrix(), GroupWhiten(), GroupWhiteningModule(),
                                   TopkMask(), DecorrelationLoss(), EighSmall())}
