"""Export of converted models in eval mode: torch.export unfolded (plain aten ops on the torch backend,
sdecor::native_whiten_apply on the native one, sdecor::whiten_apply on the triton one) and folded; ONNX of the folded model run in onnxruntime."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import sdecor
from sdecor.testing import assert_close

from conftest import INTERPRET, requires_gpu
from test_fold import randomize


def converted_net(device="cpu"):
    """Conv -> whitening (foldable), depthwise conv -> whitening (replaced), Linear -> whitening (2D)."""
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8))
    sdecor.convert_whitening(net, num_channels=4)
    return randomize(net).float().to(device).eval()


def call_targets(ep) -> set[str]:
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


def sdecor_ops(ep) -> set[str]:
    """The sdecor ops of an exported program, also inside its submodules (autocast regions)."""
    found = set()
    for gm in ep.graph_module.modules():
        if isinstance(gm, torch.fx.GraphModule):
            found |= {str(n.target) for n in gm.graph.nodes if str(n.target).startswith("sdecor.")}
    return found


def test_unfolded_export_on_the_torch_backend_is_plain_aten():
    net = converted_net()
    x = torch.randn(2, 3, 8, 8)
    with sdecor.use_backend("torch"):
        ep = torch.export.export(net, (x,))
        assert sdecor_ops(ep) == set()
        x2 = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            assert_close(ep.module()(x2), net(x2))


@pytest.mark.skipif(not sdecor._ext.available(), reason="needs the native extension sdecor._C")
def test_unfolded_export_on_the_native_backend_holds_the_cpu_op(tmp_path):
    # the default on CPU where the extension is built: eval-mode whitening is one C++ op
    net = converted_net()
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(net, (x,))
    assert sdecor_ops(ep) == {"sdecor.native_whiten_apply.default"}
    x2 = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = net(x2)
    assert_close(ep.module()(x2), want)
    path = tmp_path / "net.pt2"
    torch.export.save(ep, path)
    torch.save({"x": x2, "want": want}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, sdecor
        sdecor.ops.register_custom_ops()
        ep = torch.export.load({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        torch.testing.assert_close(ep.module()(io["x"]), io["want"], atol=1e-5, rtol=1e-5)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs Triton (GPU or interpreter)")
def test_unfolded_export_on_the_triton_backend_holds_the_custom_op(tmp_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
    sdecor.convert_whitening(net, num_channels=4)
    net = randomize(net).to(device).eval()
    x = torch.randn(2, 3, 4, 4, device=device)
    with sdecor.use_backend("triton"):
        ep = torch.export.export(net, (x,))
        with torch.no_grad():
            want = net(x)
    assert sdecor_ops(ep) == {"sdecor.whiten_apply.default"}
    assert_close(ep.module()(x), want)

    # A saved program loads in a fresh process once the sdecor ops are registered.
    path = tmp_path / "net.pt2"
    torch.export.save(ep, path)
    torch.save({"x": x.cpu(), "want": want.cpu()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, sdecor
        assert "sdecor::whiten_apply" in sdecor.ops.register_custom_ops()
        ep = torch.export.load({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        got = ep.module()(io["x"].to({device!r})).cpu()
        torch.testing.assert_close(got, io["want"], atol=1e-4, rtol=1e-4)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def folded_and_eager():
    net = converted_net()
    folded, report = sdecor.fold_whitening(net, return_report=True)
    assert [n for n, _ in report.folded] == ["1", "9"] and [n for n, _ in report.replaced] == ["4"]
    return net, folded


def test_folded_export():
    net, folded = folded_and_eager()
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(folded, (x,))
    assert sdecor_ops(ep) == set() and "aten.conv1d.default" in call_targets(ep)
    x2 = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_close(ep.module()(x2), net(x2))


def onnx_run(model, x, **kw):
    """Export to ONNX in memory and run it in onnxruntime; returns a function of a tensor."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False, **kw)
    session = ort.InferenceSession(program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda t: torch.from_numpy(session.run(None, {name: t.numpy()})[0])


def test_folded_onnx_in_onnxruntime_with_a_dynamic_batch():
    net, folded = folded_and_eager()
    run = onnx_run(folded, torch.randn(2, 3, 8, 8), dynamic_shapes=({0: torch.export.Dim("batch")},))
    for n in (1, 5):
        x = torch.randn(n, 3, 8, 8)
        with torch.no_grad():
            assert_close(run(x), net(x))


@requires_gpu
@pytest.mark.gpu
def test_folded_export_on_cuda():
    net = converted_net("cuda")
    x = torch.randn(2, 3, 8, 8, device="cuda")
    folded = sdecor.fold_whitening(net, x)
    ep = torch.export.export(folded, (x,))
    assert sdecor_ops(ep) == set()
    with torch.no_grad():
        assert_close(ep.module()(x), net(x))
