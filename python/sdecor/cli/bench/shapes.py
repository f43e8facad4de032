"""Every benchmark shape, in one place: activations and masks of real networks.

Each entry names the network and the layer it comes from. Conventions:

* whitening ops (``group_cov``, ``group_whiten``, ``GroupWhitening``, ``decorrelation_loss``) take
  x of shape ``(N, C, *S)`` with group size ``d``; ``GroupWhitening`` and ``group_whiten`` entries
  also name the whitening ``method`` ("newton" with ``T`` steps, IterNorm's default T=5, or "zca");
* ``whitening_matrix`` and ``eigh_small`` take ``G`` symmetric positive definite ``d x d``
  matrices: the covariances of the layer's ``G = C / d`` groups;
* ``topk_mask`` takes an input batch and its saliency map of the same shape (CIFAR-10 32x32 and
  ImageNet 224x224 images), masking ``ratio`` of the positions: one mask per sample shared by all
  channels (``reduce="mean"``, SaliencyDecor) or one per element (``reduce=None``, Saliency Guided
  Training).

Batch sizes: 128 for CIFAR-10 training, 64 per GPU for ImageNet. ResNet-18/CIFAR stages produce
64x32x32, 128x16x16, 256x8x8 and 512x4x4 activations; ResNet-18/ImageNet 64x56x56 .. 512x7x7;
ResNet-50/ImageNet's bottleneck blocks end in 256x56x56, 512x28x28, 1024x14x14 and 2048x7x7.
Entries tagged ``quick`` form ``--quick``: one small real shape per op, sized for a 2-core CPU.
Entries tagged ``compile`` get the torch.compile baseline under ``--compile tagged`` (the default of
``--quick``, where compiling every op would take most of the 2-minute budget on a small CPU): the
quick shapes of the two ops whose speed-up over a compiler matters most, group_whiten and topk_mask.

Suites (``--suite NAME``) are tags too: focused comparisons that run as a set. Their entries may
carry ``modes`` (the modes measured, default the op's) and ``targets``: the ratios the table prints
per path, each ``dict(mode, baseline, ratio, bound)`` with ratio "time" (path time / baseline time,
the target is at most ``bound``) or "speedup" (baseline time / path time, at least ``bound``), and
``bound`` None for a ratio shown without a target. The targets are float32 and set for 2 threads
(``--threads 2``).

* ``groupwhitening-cpu``: the whitening layer on a 32x256x28x28 activation on a CPU, float32, where
  BatchNorm2d is the yardstick (docs/design.md, "Floors"): GroupWhitening training steps (newton T=5) at d = 16 and
  64 against BatchNorm2d, the naive IterNorm and the flop floor (``floor``: the five d x d x m
  products of a training step, 2 d^2 m flops each per group, at the rate of a large square fp32
  matmul timed in the same run); GroupWhitening in eval mode at d = 16 (running statistics of one
  training step, forward under torch.no_grad) against BatchNorm2d in eval mode; and the group_cov
  forward at d = 16 against ``x.clone()`` (one read and one write of x);
* ``topk-cpu``: topk_mask on an ImageNet batch (64x3x224x224), ratio 0.5, uniform fill, shared
  (reduce="mean") and per-element masks, against Saliency Guided Training's masking
  (:func:`sdecor.cli.bench.baselines.sgt_mask`);
* ``eigh``: eigh_small against torch.linalg.eigh on the batches where torch's solver paths differ
  (d <= 32: one batched Jacobi call; d > 32: one solver call per matrix), X X^T / m with m = 3d + 1;
* ``steps-cpu``: whole training steps of ResNet-18 (BatchNorm, GroupWhitening, IterNorm, Saliency
  Guided Training, SaliencyDecor); no per-op entries, its paths and targets are in
  :mod:`sdecor.cli.bench.steps`;
* ``choice-cpu``: native against torch for every cell (op, dtype, range of d) of the CPU choice
  table :data:`sdecor._cpu_choice.CHOICE`, and the measured table beside it; no per-op entries, its
  cases are in :mod:`sdecor.cli.bench.choice` (CPU only, every dtype of the table whatever
  ``--dtypes`` says).

The GroupWhitening training entries of ``groupwhitening-cpu`` also carry ``compiled_iternorm``: the
naive IterNorm under torch.compile (``iternorm-compile``, what a user tries first) is measured there,
compiled and warmed up before the timed calls, and sdecor must beat it at d = 16 and 64.
"""

from __future__ import annotations

OPS = (
    "group_cov",
    "whitening_matrix",
    "group_whiten",
    "GroupWhitening",
    "topk_mask",
    "decorrelation_loss",
    "eigh_small",
)

DTYPES = ("float32", "float16", "bfloat16")

SUITES = ("groupwhitening-cpu", "topk-cpu", "eigh", "steps-cpu", "choice-cpu")

# (network, stage, N, C, spatial)
_R18_CIFAR = [
    ("resnet18-cifar", "stage1", 128, 64, (32, 32)),
    ("resnet18-cifar", "stage2", 128, 128, (16, 16)),
    ("resnet18-cifar", "stage3", 128, 256, (8, 8)),
    ("resnet18-cifar", "stage4", 128, 512, (4, 4)),
]
_R18_IMAGENET = [
    ("resnet18-imagenet", "stage1", 64, 64, (56, 56)),
    ("resnet18-imagenet", "stage2", 64, 128, (28, 28)),
    ("resnet18-imagenet", "stage3", 64, 256, (14, 14)),
    ("resnet18-imagenet", "stage4", 64, 512, (7, 7)),
]
_R50_IMAGENET = [
    ("resnet50-imagenet", "stage1", 64, 256, (56, 56)),
    ("resnet50-imagenet", "stage2", 64, 512, (28, 28)),
    ("resnet50-imagenet", "stage3", 64, 1024, (14, 14)),
    ("resnet50-imagenet", "stage4", 64, 2048, (7, 7)),
]
_ACTIVATIONS = _R18_CIFAR + _R18_IMAGENET + _R50_IMAGENET

QUICK_LAYER = ("resnet18-cifar", "stage3")


def _activation_entries(op: str, extra: dict, groups=(16,)) -> list[dict]:
    out = []
    for net, stage, N, C, S in _ACTIVATIONS:
        for d in groups:
            name = f"{net}-{stage}-d{d}"
            if extra.get("method") == "zca":
                name += "-zca"
            tags = ("quick",) if (net, stage) == QUICK_LAYER and d == 16 and extra.get("method") != "zca" else ()
            out.append(dict(op=op, name=name, N=N, C=C, S=S, d=d, tags=tags, **extra))
    return out


def _matrix_entries(op: str, extra: dict) -> list[dict]:
    """Covariance batches of real layers: G = C / d groups of d x d."""
    out = []
    for net, stage, _, C, _ in _R18_CIFAR + _R50_IMAGENET:
        for d in (16, 64):
            if C % d or (d == 64 and net == "resnet18-cifar" and stage != "stage4"):
                continue
            name = f"{net}-{stage}-d{d}"
            if extra.get("method") == "zca":
                name += "-zca"
            quick = (net, stage) == QUICK_LAYER and d == 16 and extra.get("method", "newton") == "newton"
            out.append(dict(op=op, name=name, G=C // d, d=d, tags=("quick",) if quick else (), **extra))
    return out


def _target(baseline: str, ratio: str, bound: float | None, mode: str = "fwdbwd") -> dict:
    return dict(mode=mode, baseline=baseline, ratio=ratio, bound=bound)


def _mask_entries() -> list[dict]:
    out = []
    for data, N, C, S in (("cifar10", 128, 3, (32, 32)), ("imagenet", 64, 3, (224, 224))):
        for reduce, label in (("mean", "shared"), (None, "per-element")):
            for ratio in (0.1, 0.5):
                name = f"{data}-{label}-r{ratio}"
                quick = data == "cifar10" and reduce == "mean" and ratio == 0.5
                # SGT fills with uniform noise; the shared (SaliencyDecor) masks here fill zeros
                suite = data == "imagenet" and reduce is None and ratio == 0.5
                entry = dict(op="topk_mask", name=name, N=N, C=C, S=S, ratio=ratio, reduce=reduce,
                             fill="zero" if reduce == "mean" else "uniform",
                             tags=("quick",) if quick else ("topk-cpu",) if suite else ())
                if suite:
                    entry["targets"] = (_target("sgt", "speedup", 3.0, "fwd"),)
                out.append(entry)
    # the shared mask with SGT's uniform fill: the same fill as the per-element entries
    out.append(dict(op="topk_mask", name="imagenet-shared-r0.5-uniform", N=64, C=3, S=(224, 224), ratio=0.5,
                    reduce="mean", fill="uniform", targets=(_target("sgt", "speedup", 4.0, "fwd"),),
                    tags=("topk-cpu",)))
    return out


def _groupwhitening_cpu_entries() -> list[dict]:
    # batch 32 of a 256-channel 28x28 activation: 6.4 M elements, a training step of tens of ms on
    # a 2-core CPU, where BatchNorm2d is the yardstick
    shape = dict(N=32, C=256, S=(28, 28))
    tag = ("groupwhitening-cpu",)
    train = {
        16: (_target("batchnorm", "time", 1.1), _target("floor", "time", None), _target("iternorm", "speedup", None),
             _target("iternorm-compile", "speedup", 1.0)),
        64: (_target("floor", "time", 1.3), _target("iternorm", "speedup", 2.0), _target("batchnorm", "time", None),
             _target("iternorm-compile", "speedup", 1.0)),
    }
    out = [dict(op="GroupWhitening", name=f"cpu-32x256x28x28-d{d}", **shape, d=d, method="newton", T=5,
                flop_floor=True, compiled_iternorm=True, targets=train[d], tags=tag) for d in (16, 64)]
    out.append(dict(op="GroupWhitening", name="cpu-32x256x28x28-d16-eval", **shape, d=16, method="newton", T=5,
                    eval=True, modes=("fwd",), targets=(_target("batchnorm", "time", 1.3, "fwd"),), tags=tag))
    out.append(dict(op="group_cov", name="cpu-32x256x28x28-d16", **shape, d=16, modes=("fwd",),
                    targets=(_target("clone", "time", 1.0, "fwd"),), tags=tag))
    return out


def _eigh_batch_entries() -> list[dict]:
    # torch.linalg.eigh runs one batched Jacobi call up to d = 32 and one solver call per matrix
    # above; m = 3d + 1 samples give less well conditioned covariances than the layer entries
    return [dict(op="eigh_small", name=f"batch{G}-d{d}", G=G, d=d, m=3 * d + 1, tags=("eigh",))
            for G, d in ((1024, 16), (1024, 32), (256, 64), (64, 128))]


def _decorrelation_entries() -> list[dict]:
    # the input of the last nn.Linear (the objective's default layer), then conv features
    out = [
        dict(op="decorrelation_loss", name="resnet18-cifar-fc-d16", N=128, C=512, S=(), d=16,
             kind="decov", tags=("quick",)),
        dict(op="decorrelation_loss", name="resnet18-cifar-fc-d16-corr", N=128, C=512, S=(), d=16,
             kind="corr", tags=()),
        dict(op="decorrelation_loss", name="resnet50-imagenet-fc-d64", N=64, C=2048, S=(), d=64,
             kind="decov", tags=()),
    ]
    for net, stage, N, C, S in (_R18_CIFAR[3], _R50_IMAGENET[3]):
        out.append(dict(op="decorrelation_loss", name=f"{net}-{stage}-d16", N=N, C=C, S=S, d=16,
                        kind="decov", tags=()))
    return out


def _tag_compile(entries: list[dict]) -> list[dict]:
    for e in entries:
        if e["op"] in ("group_whiten", "topk_mask") and "quick" in e["tags"]:
            e["tags"] = e["tags"] + ("compile",)
    return entries


SHAPES: list[dict] = _tag_compile(
    _activation_entries("group_cov", {})
    + _matrix_entries("whitening_matrix", dict(method="newton", T=5))
    + _matrix_entries("whitening_matrix", dict(method="zca", T=5))
    + _activation_entries("group_whiten", dict(method="newton", T=5), groups=(16, 64))
    + [e for e in _activation_entries("group_whiten", dict(method="zca", T=5)) if e["N"] == 128]
    + _activation_entries("GroupWhitening", dict(method="newton", T=5))
    + _groupwhitening_cpu_entries()
    + _mask_entries()
    + _decorrelation_entries()
    + _matrix_entries("eigh_small", {})
    + _eigh_batch_entries()
)


def shapes_for(op: str) -> list[dict]:
    return [s for s in SHAPES if s["op"] == op]


def numel(entry: dict) -> int:
    """Elements of the op's main input (x, or the G d x d matrices)."""
    if "G" in entry:
        return entry["G"] * entry["d"] * entry["d"]
    n = entry["N"] * entry["C"]
    for s in entry["S"]:
        n *= s
    return n


def describe(entry: dict) -> str:
    """Short shape text for tables: "128x256x8x8 d16 newton" or "G16 d16"."""
    if "G" in entry:
        text = f"{entry['G']}x{entry['d']}x{entry['d']}"
    else:
        text = "x".join(str(v) for v in (entry["N"], entry["C"], *entry["S"]))
    if "d" in entry and "G" not in entry:
        text += f" d{entry['d']}"
    if "method" in entry:
        text += f" {entry['method']}" + (f" T{entry['T']}" if entry["method"] == "newton" else "")
    if "ratio" in entry:
        text += f" r{entry['ratio']} {entry['reduce'] or 'elem'} {entry['fill']}"
    if "kind" in entry:
        text += f" {entry['kind']}"
    if entry.get("eval"):
        text += " eval"
    return text
