"""Trace the GPU dispatch of sdecor's Triton ops on fake CUDA tensors (no GPU, no interpreter).

Under FakeTensorMode a ``triton_op`` runs its Python launcher (shapes, strides, grid, block sizes,
dtype plumbing) with fake tensors and records the kernels instead of launching them, so the GPU path
up to the kernel launch can be exercised on a machine without a GPU. Prints one JSON line per case.
Run with TRITON_INTERPRET unset (see tests/test_fake_cuda_dispatch.py).
"""

import json
import types

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

# The launchers size their grids from the SM count; there is no device to ask.
torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(
    multi_processor_count=132, name="fake H100", major=9, minor=0, total_memory=80 << 30)

import sdecor  # noqa: E402
from sdecor.ops import whiten  # noqa: E402


def describe(t):
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "device": t.device.type,
            "channels_last": t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
            and not t.is_contiguous()}


def case(name, fn):
    try:
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        print(json.dumps({"case": name, "ok": True, "outputs": [describe(o) for o in outs]}))
    except Exception as exc:  # reported, the test fails on it
        print(json.dumps({"case": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}))


with FakeTensorMode(), sdecor.use_backend("triton"):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for d, shape in ((16, (4, 48, 7, 7)), (4, (3, 12, 5)), (64, (2, 128, 3, 3)), (3, (5, 6))):
            x = torch.empty(shape, device="cuda", dtype=dtype)
            tag = f"{str(dtype)[6:]}-{'x'.join(map(str, shape))}-d{d}"
            for method in ("newton", "zca"):
                case(f"group_whiten-{method}-{tag}", lambda: sdecor.group_whiten(x, d, method=method))
            case(f"group_cov-{tag}", lambda: sdecor.group_cov(x, d))
            C = shape[1]
            w = torch.empty(C, device="cuda")
            case(f"group_whiten_train-affine-{tag}",
                 lambda: whiten.group_whiten_train(x, d, weight=w, bias=w))
            G = C // d
            case(f"group_whiten_eval-{tag}",
                 lambda: whiten.group_whiten_eval(x, torch.empty(G, d, device="cuda"),
                                                     torch.empty(G, d, d, device="cuda"), w, w))
        xcl = torch.empty(4, 32, 6, 5, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        case(f"group_whiten-channels_last-{str(dtype)[6:]}", lambda: sdecor.group_whiten(xcl, 16))
        case(f"whitening_matrix-newton-T100-{str(dtype)[6:]}",
             lambda: sdecor.whitening_matrix(torch.empty(3, 32, 32, device="cuda"), T=100))
        s = torch.empty(4, 3, 16, 16, device="cuda", dtype=dtype)
        for reduce in ("mean", None):
            for fill in ("zero", "constant", "mean", "baseline"):
                base = torch.empty_like(s) if fill == "baseline" else None
                case(f"topk_mask-{fill}-{reduce}-{str(dtype)[6:]}",
                     lambda: sdecor.topk_mask(s, s, ratio=0.5, reduce=reduce, fill=fill, value=1.0,
                                              baseline=base))
