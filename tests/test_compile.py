"""torch.compile(fullgraph=True) of a network with GroupWhitening layers on CPU, torch backend."""

import copy

import pytest
import torch
from torch import nn

import sdecor
from sdecor.nn import GroupWhitening
from sdecor.testing import assert_close


def small_net():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3),
        GroupWhitening(16, 8, momentum=0.2),
        nn.ReLU(inplace=True),
        GroupWhitening(16, 6, momentum=0.3, last_group="smaller"),     # groups of 6, 6 and 4 channels
        nn.Conv2d(16, 16, 1),
        GroupWhitening(16, 4, method="zca", momentum=None),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="needs torch.compile")
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    eager = small_net()
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, fullgraph=True, dynamic=False)
    x = torch.randn(4, 3, 6, 6)
    with sdecor.use_backend("torch"):
        for step in range(2):                                     # training: output, grads, buffers
            xe = (x + step).requires_grad_()
            xc = (x + step).requires_grad_()
            ye = eager(xe)
            yc = compiled(xc)
            assert_close(yc, ye)
            ye.square().sum().backward()
            yc.square().sum().backward()
            assert_close(xc.grad, xe.grad)
        for (name, pe), pc in zip(eager.named_parameters(), compiled_net.parameters()):
            assert_close(pc.grad, pe.grad, msg=name)
        for (name, be), bc in zip(eager.named_buffers(), compiled_net.buffers()):
            if be.is_floating_point():
                assert_close(bc, be, msg=name)
            else:
                assert torch.equal(bc, be), name
        assert int(compiled_net[1].num_batches_tracked) == 2
        eager.eval()
        compiled_net.eval()
        assert_close(compiled(x), eager(x))                       # eval: running statistics
