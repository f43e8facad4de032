"""Argument checks of every public function and module, in one place.

Each public call runs its checks once, before any work, and raises TypeError / ValueError naming the
argument and what was expected (docs/design.md, "Semantics"). The reference, the op modules
(:mod:`sdecor.ops`) and the modules (:mod:`sdecor.nn`) all call these; nothing below them checks
again.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist

from ._layout import group_layout

__all__ = [
    "DECOR_KINDS",
    "FILLS",
    "LABEL_DTYPES",
    "LAST_GROUPS",
    "MAX_NEWTON_STEPS",
    "METHODS",
    "REDUCES",
    "check_affine",
    "check_bool",
    "check_corr_groups",
    "check_cov",
    "check_decor_args",
    "check_device",
    "check_float_tensor",
    "check_eps",
    "check_finite_nonneg",
    "check_float_dtype",
    "check_generator",
    "check_groups",
    "check_input",
    "check_label_range",
    "check_labels",
    "check_last_group",
    "check_mask_args",
    "check_mask_options",
    "check_module_input",
    "check_process_group",
    "check_state",
    "check_stats",
    "check_training_samples",
    "check_whitening_args",
    "divisors",
    "is_finite_number",
    "is_number",
    "resolve_k",
]

METHODS = ("zca", "newton")
FILLS = ("zero", "constant", "mean", "uniform", "baseline")
REDUCES = ("mean", None)
DECOR_KINDS = ("decov", "corr")
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
LAST_GROUPS = ("even", "smaller")
MAX_NEWTON_STEPS = 100


def is_number(v) -> bool:
    """A Python int or float (not a bool)."""
    return not isinstance(v, bool) and isinstance(v, (int, float))


def is_finite_number(v) -> bool:
    """A Python int or float (not a bool) that is neither inf nor nan (nor an int beyond float range)."""
    if not is_number(v):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:                # an int too large for a float (> ~1.8e308)
        return False


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


# ---------------------------------------------------------------------------------------------------
# tensors


def check_input(x, name: str = "x", min_dim: int = 2, max_dim: int = 5) -> None:
    """A floating-point tensor (N, C, *S) with min_dim to max_dim dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if not (min_dim <= x.dim() <= max_dim):
        raise ValueError(
            f"{name} must have shape (N, C, *S) with 0 to {max_dim - 2} trailing dims "
            f"({min_dim} to {max_dim} dims); got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")


def check_module_input(x, num_features: int, module: str) -> None:
    """The input of a whitening module: a 2D to 5D float tensor with ``num_features`` channels."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor; got {type(x).__name__}")
    if not 2 <= x.dim() <= 5:
        raise ValueError(f"expected a 2D to 5D input (N, C, *S) to {module}; "
                         f"got a {x.dim()}D input of shape {tuple(x.shape)}")
    if x.shape[1] != num_features:
        raise ValueError(f"expected {num_features} channels (dim 1 of the input, num_features) "
                         f"for {module}; got input of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor; got dtype {x.dtype}")


def check_state(owner: str, tensors, x: torch.Tensor | None = None) -> None:
    """The parameters and buffers of the layer ``owner`` ((name, tensor or None) pairs): floating-point
    (real) tensors but the batch counter ``num_batches_tracked``, all on one device, which is x's when
    the input x is given. Metadata only: nothing is read from a device, so it may run in a forward.

    Their dtypes need not be x's: statistics and matrices are converted where they are used (an fp32
    layer under bf16 autocast, an fp64 layer on fp32 input); a complex or integer one cannot be.
    """
    first = None
    for name, t in tensors:
        if t is None:
            continue
        if name != "num_batches_tracked" and not t.is_floating_point():
            raise TypeError(f"{owner}: {name} must be a floating-point tensor; got dtype {t.dtype}")
        if x is not None:
            if t.device != x.device:
                raise ValueError(
                    f"{owner}: {name} is on {t.device} but the input is on {x.device}; a layer's "
                    f"parameters and buffers must be on its input's device (move the layer with "
                    f".to({str(x.device)!r}), or the input with .to({str(t.device)!r}))")
        elif first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise ValueError(f"{owner}: {name} is on {t.device} but {first[0]} is on {first[1]}; a layer's "
                             f"parameters and buffers must be on one device")


def check_bool(value, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__} {value!r}")


def check_device(device, name: str = "device") -> None:
    """None or what torch.device takes: a torch.device, a device string ("cpu", "cuda:1", "meta") or
    a CUDA index (an int >= 0)."""
    if device is None or isinstance(device, torch.device):
        return
    if isinstance(device, str) or (isinstance(device, int) and not isinstance(device, bool)):
        try:
            torch.device(device)
            return
        except (RuntimeError, ValueError):
            pass
    raise ValueError(f"{name} must be None, a torch.device, a device string (e.g. 'cpu', 'cuda:0') or a "
                     f"CUDA device index; got {type(device).__name__} {device!r}")


def check_process_group(process_group) -> None:
    """A torch.distributed ProcessGroup this process belongs to, in an initialised torch.distributed;
    TypeError or ValueError naming ``process_group`` otherwise."""
    if not dist.is_available():
        raise ValueError("process_group needs torch.distributed, which this build of torch does not have")
    if not isinstance(process_group, dist.ProcessGroup):
        hint = (" (torch.distributed.new_group returns this marker to processes outside the group: only "
                "its members may pass it)" if process_group is dist.GroupMember.NON_GROUP_MEMBER else "")
        raise TypeError(f"process_group must be None or a torch.distributed.ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD, or one from torch.distributed.new_group); got "
                        f"{type(process_group).__name__} {process_group!r}{hint}")
    if not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialised (call "
                         "torch.distributed.init_process_group first)")
    try:
        dist.get_world_size(process_group)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"process_group cannot be used by this process: {err}") from None


def check_last_group(last_group) -> None:
    """last_group: "even" (d must divide C) or "smaller" (the last group may hold fewer channels)."""
    if not isinstance(last_group, str) or last_group not in LAST_GROUPS:
        raise ValueError(f"last_group must be one of {LAST_GROUPS}; got {last_group!r}")


def check_groups(num_channels: int, C: int, last_group: str = "even") -> int:
    """Validate the group size d against C channels and return the number of groups G.

    last_group="even": d must divide C, G = C // d. "smaller": any d >= 1, G = ceil(C / d), the last
    group holding the r = C - (G - 1) d remaining channels (IterNorm's flexible groups).
    """
    check_last_group(last_group)
    if isinstance(num_channels, bool) or not isinstance(num_channels, int):
        raise TypeError(f"num_channels must be an int; got {type(num_channels).__name__}")
    if num_channels < 1:
        raise ValueError(f"num_channels (group size d) must be a positive int; got {num_channels}")
    if last_group == "even" and C % num_channels != 0:
        raise ValueError(
            f"num_channels (group size d={num_channels}) must divide the channel count C={C}; "
            f"valid group sizes for C={C} are {divisors(C)}, or pass last_group=\"smaller\" for a "
            f"last group of C % d = {C % num_channels} channels")
    return group_layout(C, num_channels)[0]


def check_training_samples(x: torch.Tensor) -> int:
    """m = N * prod(S) >= 2 values per channel (as BatchNorm); returns m."""
    m = x.shape[0] * math.prod(x.shape[2:])
    if m < 2:
        raise ValueError(
            f"training statistics need more than 1 value per channel (m = N * prod(S) >= 2); "
            f"got x of shape {tuple(x.shape)} (m={m})")
    return m


def check_labels(y, x: torch.Tensor, name: str = "y") -> None:
    """Class indices of the batch x: an integer tensor (N,) on x's device (any of LABEL_DTYPES)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor of class indices; got {type(y).__name__}")
    if y.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of class indices (int64, int32, int16, int8 or "
                        f"uint8); got dtype {y.dtype}")
    N = x.shape[0]
    if y.shape != (N,):
        raise ValueError(f"{name} must be a tensor of N={N} class indices, shape ({N},); "
                         f"got shape {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}; got {y.device}")


def check_label_range(y: torch.Tensor, num_classes: int, name: str = "y") -> None:
    """Class indices in [0, num_classes), checked for CPU tensors only.

    On a GPU the check would cost a host sync per call; there the consumer's own device-side
    assert (cross_entropy's, gather's) stops a bad index instead.
    """
    if y.device.type != "cpu" or y.numel() == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name} must hold class indices in [0, {num_classes}) (num_classes = the logits' "
                         f"dim 1); got {lo if lo < 0 else hi}")


def check_affine(t, name: str, x: torch.Tensor) -> None:
    """An optional per-channel affine parameter (weight or bias): None or a float tensor (C,) on x's device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None; got {type(t).__name__}")
    C = x.shape[1]
    if t.shape != (C,):
        raise ValueError(f"{name} must have shape (C,) = ({C},); got {tuple(t.shape)}")
    check_float_tensor(t, name, x)


def check_cov(cov) -> None:
    if not isinstance(cov, torch.Tensor):
        raise TypeError(f"cov must be a torch.Tensor; got {type(cov).__name__}")
    if cov.dim() < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"cov must have shape (..., d, d); got {tuple(cov.shape)}")
    if not cov.is_floating_point():
        raise TypeError(f"cov must be a floating-point tensor; got dtype {cov.dtype}")


def check_float_tensor(t, name: str, x: torch.Tensor) -> None:
    """A floating-point tensor on x's device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}; got {t.device}")


def check_stats(mean, wm, x: torch.Tensor) -> tuple[int, int]:
    """Given statistics of group whitening: wm (G, d, d) and mean (G, d) or (G, d, 1), for the C
    channels of x in G groups of d, the last of which may be smaller ((G - 1) d < C <= G d, its
    statistics in the top-left block, as GroupWhitening's buffers with last_group="smaller").
    Returns (G, d)."""
    check_float_tensor(mean, "mean", x)
    check_float_tensor(wm, "wm", x)
    if wm.dim() != 3 or wm.shape[-1] != wm.shape[-2]:
        raise ValueError(f"wm must have shape (G, d, d); got {tuple(wm.shape)}")
    G, d = wm.shape[0], wm.shape[-1]
    C = x.shape[1]
    if not (G - 1) * d < C <= G * d:
        raise ValueError(f"wm of shape {tuple(wm.shape)} gives G*d = {G * d} channels; x has C={C} "
                         f"(G groups of d, the last one possibly smaller: (G-1)*d < C <= G*d)")
    if mean.shape not in ((G, d), (G, d, 1)):
        raise ValueError(f"mean must have shape (G, d) = ({G}, {d}) (or (G, d, 1)); got {tuple(mean.shape)}")
    return G, d


# ---------------------------------------------------------------------------------------------------
# options


def check_eps(eps, name: str = "eps") -> None:
    """eps: a finite number > 0 (docs/design.md, "Semantics"). With eps = 0 a singular covariance (a constant channel, a
    group of more channels than samples) gives W = inf / NaN; with eps = inf, W = 0."""
    if not is_finite_number(eps) or not eps > 0:
        raise ValueError(f"{name} must be a finite number > 0; got {eps!r}")


def check_finite_nonneg(value, name: str) -> None:
    """A finite number >= 0 (a loss weight, say): inf or nan would make every step's loss inf / NaN."""
    if not is_finite_number(value) or not value >= 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")


def check_float_dtype(dtype, name: str = "dtype") -> None:
    """None (the default dtype) or a floating-point torch.dtype, for a module's parameters and buffers."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a floating-point torch.dtype or None; got {type(dtype).__name__}")
    if not dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.dtype or None; got {dtype}")


def check_whitening_args(method: str, eps: float, T: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    check_eps(eps)
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_NEWTON_STEPS:
        raise ValueError(f"T (Newton-Schulz steps) must be an int in [1, {MAX_NEWTON_STEPS}]; got {T!r}")


def check_decor_args(num_channels, kind: str) -> None:
    if kind not in DECOR_KINDS:
        raise ValueError(f"kind must be one of {DECOR_KINDS}; got {kind!r}")
    if kind == "corr" and isinstance(num_channels, int) and num_channels < 2:
        raise ValueError(f"kind='corr' needs groups of at least 2 channels; got num_channels={num_channels}")


def check_corr_groups(num_channels: int, C: int) -> None:
    """kind='corr' with last_group="smaller": the last group, of C - (G - 1) d channels, needs 2 too."""
    if group_layout(C, num_channels)[1] < 2:
        raise ValueError(f"kind='corr' needs groups of at least 2 channels; the last group of C={C} "
                         f"channels in groups of num_channels={num_channels} holds 1")


def resolve_k(D: int | None, ratio, k) -> int | None:
    """k = floor(ratio * D) or k itself; exactly one of them, within [0, D].

    With D None (options checked before any input is seen) only the ranges that do not depend on D
    are checked, and None is returned.
    """
    if (ratio is None) == (k is None):
        raise ValueError(f"give exactly one of ratio and k; got ratio={ratio!r}, k={k!r}")
    if ratio is not None:
        if not is_number(ratio) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be a number in [0, 1]; got {ratio!r}")
        return None if D is None else int(math.floor(ratio * D))
    if D is None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be a non-negative int; got {k!r}")
        return None
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= D:
        raise ValueError(f"k must be an int in [0, D={D}] (D = scores per sample); got {k!r}")
    return k


def check_mask_options(reduce, fill, value, *, largest=False, abs_=True, value_always: bool = False) -> None:
    """reduce, fill, the constant ``value`` (checked for fill='constant', or always) and the flags
    largest and abs (bools: a string such as "no" would read as True)."""
    check_bool(largest, "largest")
    check_bool(abs_, "abs")
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be 'mean' or None; got {reduce!r}")
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}; got {fill!r}")
    if (value_always or fill == "constant") and not is_number(value):
        raise ValueError("value must be a number" + ("" if value_always else " for fill='constant'")
                         + f"; got {value!r}")


def check_mask_args(x, saliency, reduce, fill, value, baseline, largest=False, abs_=True) -> None:
    """Every argument of topk_mask but ratio/k (see :func:`resolve_k`) and the generator."""
    check_input(x, "x", min_dim=2, max_dim=5)
    # bool / integer scores: abs() is undefined for bool, and the ranking keys are float bits
    check_float_tensor(saliency, "saliency", x)
    if saliency.shape != x.shape:
        raise ValueError(f"saliency must have the shape of x {tuple(x.shape)}; got {tuple(saliency.shape)}")
    check_mask_options(reduce, fill, value, largest=largest, abs_=abs_)
    if reduce == "mean" and x.shape[1] == 0:
        # the channel mean of no channels has no value to rank (0 / 0)
        raise ValueError(f"x must have at least one channel for reduce='mean' (scores are channel means); "
                         f"got shape {tuple(x.shape)}")
    if fill == "baseline":
        if not isinstance(baseline, torch.Tensor) or baseline.shape != x.shape:
            got = tuple(baseline.shape) if isinstance(baseline, torch.Tensor) else type(baseline).__name__
            raise ValueError(f"fill='baseline' needs baseline, a tensor shaped like x {tuple(x.shape)}; got {got}")
        if baseline.device != x.device:
            raise ValueError(f"baseline must be on x's device {x.device}; got {baseline.device}")
    elif baseline is not None:
        raise ValueError(f"baseline is only used with fill='baseline'; got fill={fill!r}")


def check_generator(generator, device: torch.device | None = None) -> None:
    """None or a torch.Generator (on ``device``'s type when a device is given)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    if device is not None and generator.device.type != device.type:
        raise ValueError(f"generator must be on x's device type {device.type!r}; got a generator on "
                         f"{generator.device.type!r}")


def report_model_args(x) -> tuple:
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, (tuple, list)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(x)
    if isinstance(x, (tuple, list)):
        kinds = sorted({type(t).__name__ for t in x})
        what = "an empty " + type(x).__name__ if not x else f"a {type(x).__name__} of {', '.join(kinds)}"
        raise TypeError(f"x must be a tensor or a non-empty tuple / list of tensors (the model's positional "
                        f"arguments); got {what}")
    raise TypeError(f"x must be a tensor or a non-empty tuple / list of tensors (the model's positional "
                    f"arguments); got {type(x).__name__}")


def report_tol(tol) -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"tol must be a number; got {type(tol).__name__}")
    value = float(tol)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"tol must be a finite number > 0; got {tol!r}")
    return value
