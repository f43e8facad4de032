"""The GPU dispatch of the Triton ops, traced on fake CUDA tensors: no GPU and no interpreter needed.

Under FakeTensorMode the triton_op launchers run for CUDA tensors (the real GPU code path up to the
kernel launch: backend choice, custom-op registration with triton_op + wrap_triton, shapes, strides,
grids, dtypes) without launching kernels. The output metadata must be what the semantics require.
Not covered here, for want of a device: backward passes (the autograd engine needs a CUDA context)
and the uniform fill (it draws from a CUDA generator); the interpreter tests cover their numbers.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "fake_cuda_dispatch.py"


def test_triton_gpu_dispatch_traces_on_fake_cuda_tensors():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) >= 60, proc.stdout[-2000:]
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n".join(f"{r['case']}: {r['error']}" for r in failed)
    for r in rows:
        outs = r["outputs"]
        assert all(o["device"] == "cuda" for o in outs), r
        name = r["case"]
        if name.startswith(("group_whiten-", "group_whiten_train", "group_whiten_eval")):
            y = outs[0]
            dtype = name.split("-")[-3] if name.count("-") >= 3 else None
            if "channels_last" in name:
                assert y["channels_last"] and y["shape"] == [4, 32, 6, 5], r
            else:
                assert y["dtype"] == dtype, r                        # output in the input's dtype
        if name.startswith("group_whiten_train"):
            assert outs[1]["dtype"] == "float32" and outs[2]["dtype"] == "float32", r
        if name.startswith("group_cov"):
            assert [o["dtype"] for o in outs] == ["float32", "float32"], r
        if name.startswith("topk_mask"):
            x_masked, mask = outs
            assert mask["dtype"] == "bool" and x_masked["shape"] == [4, 3, 16, 16], r
            reduce = name.split("-")[2]                              # topk_mask-<fill>-<reduce>-<dtype>
            assert mask["shape"] == ([4, 16, 16] if reduce == "mean" else [4, 3, 16, 16]), r
