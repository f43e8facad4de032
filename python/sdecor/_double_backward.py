"""Double backward (a backward run with create_graph=True) of ops whose own backward is hand-written.

:func:`graph_backward` differentiates a torch formulation of the op, recomputed from the saved
inputs, so that the gradients carry a graph; :class:`NoThirdDerivative` attaches to a graph values
whose derivative is not implemented, so that differentiating them raises instead of silently giving
nothing (docs/design.md, "Precision": double backward is exact or an error that says so).
"""

from __future__ import annotations

import torch

__all__ = ["NoThirdDerivative", "graph_backward"]


def graph_backward(fn, inputs, needs, grad_outputs) -> list:
    """Gradients of ``fn(*inputs)`` w.r.t. the inputs flagged in ``needs``, as a graph (create_graph).

    The backward of an op whose own backward is hand-written (or a kernel without a derivative) when
    a graph of the backward is requested (double backward): ``fn`` is a differentiable torch
    formulation of the op, recomputed here from the saved inputs, so that the gradients are
    differentiable w.r.t. the inputs and ``grad_outputs``. Returns one entry per input (None where
    not needed); ``grad_outputs`` None for an output means no gradient flows into it.
    """
    wanted = [i for i, (t, n) in enumerate(zip(inputs, needs)) if n and t is not None]
    result = [None] * len(inputs)
    with torch.enable_grad():
        outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    if not wanted or not pairs:
        return result
    grads = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                create_graph=True, allow_unused=True)
    for i, g in zip(wanted, grads):
        result[i] = torch.zeros_like(inputs[i]) if g is None else g
    return result


class NoThirdDerivative(torch.autograd.Function):
    """Copies of ``values``, attached to the graph of ``sources`` (what they were computed from);
    differentiating them raises. torch's once_differentiable attaches its error to detached copies,
    so a third derivative through it is silently left out (or zero with allow_unused) instead."""

    @staticmethod
    def forward(ctx, what, values, *sources):
        ctx.what = what
        ctx.set_materialize_grads(False)
        return tuple(v.clone() for v in values)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.what}: a third derivative is not implemented (double backward, i.e. "
                           f"one backward with create_graph=True followed by another, is exact)")
