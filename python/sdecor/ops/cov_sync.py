"""Group statistics of the union of all ranks' samples, for the decorrelation loss under
torch.distributed (``decorrelation_loss(..., process_group=...)`` and ``SaliencyDecor``).

Every rank r of the group holds its own x_r (N_r, C, *S), N_r >= 0; each group's mean and covariance
are those of the concatenation of all x_r, n = sum m_r values per channel (m_r = N_r prod(S)). What
travels, per call (features never do):

header   one all_reduce (max) of an int64 table (W, 6): rank r writes its row (its arguments passed
         their checks, C, d, kind, last group, m_r), the other rows hold -2^63, so that after the max
         every rank holds every rank's row. Every rank reads the same table: a disagreement
         (channel counts, group size, kind, last group), a rank whose arguments failed their checks,
         or n < 2 raise the same ValueError on every rank, instead of leaving the others waiting in
         the next collective; and n is known on the host. The table is made of shapes, and travels
         as a CPU tensor where the group takes CPU tensors (gloo, mpi, ucc): then nothing here waits
         for the device. On a group of device tensors only (nccl) it travels on the device, and
         reading it back waits for the device.
scale    kind "corr" on float64 input only: one all_reduce (max) of the G power-of-two exponents
         that bring every group below 2^48 on all ranks (as :func:`sdecor._decorrelation.scale_for_corr`
         does for one process: the correlation does not change, and sum x x^T stays finite at any
         finite scale of x). Other dtypes need none: x x^T of their values fits float64.
moments  one all_reduce (sum) of each group's sum x (d numbers) and sum x x^T (d x d), accumulated
         in float64: G (d + d^2) numbers (a smaller last group of r channels: r + r^2); then
         mean = sum x / n, cov = sum x x^T / n - mean mean^T on every rank alike.

Precision: the covariance from float64 moments about 0 has a relative error of about
1e-16 (|mean| / std)^2: 1e-8 where the means (of the ranks, or of the whole) lie 1e4 standard
deviations from 0, below float32's resolution of the features themselves.

Gradients: the loss L(S) of the summed moments S = sum_r s_r is the same on every rank, and its
gradient w.r.t. this rank's x is dL/dS ds_r/dx_r: dL/dS is at hand on every rank, so the backward
needs no communication. S enters autograd as S + (s_r - s_r.detach()): the value S exactly, the
gradient that of s_r. (torch.distributed.nn.functional.all_reduce would all-reduce the W ranks'
identical dL/dS in the backward instead: a second collective, and W times this gradient.)
``grad_scale`` multiplies the gradient, not the value (see SaliencyDecor).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .._checks import DECOR_KINDS, LAST_GROUPS, check_process_group
from .._decorrelation import CORR_MAX_EXP
from .._layout import grouped, split_channels
from .._precision import power_of_two

__all__ = ["check_header", "check_process_group", "exchange_header", "global_cov", "header_row", "parts",
           "world_size"]


# ---------------------------------------------------------------------------------------------------
# the process group


def world_size(process_group) -> int:
    """1 for None (no communication), else the size of the checked group."""
    if process_group is None:
        return 1
    check_process_group(process_group)
    return dist.get_world_size(process_group)


# ---------------------------------------------------------------------------------------------------
# header: every rank's arguments, for the checks across ranks

_ABSENT = -2 ** 63                                                   # the other ranks' rows before the max
_FIELDS = ("passed", "C", "num_channels", "kind", "last_group", "m")


def header_row(passed: bool, x, num_channels, kind, last_group) -> list[int]:
    """This rank's row of the header (-1 for what its arguments do not say)."""
    shaped = isinstance(x, Tensor) and x.dim() >= 2
    m = 1
    for s in (x.shape[:1] + x.shape[2:] if shaped else ()):
        m *= s
    return [int(passed),
            x.shape[1] if shaped else -1,
            num_channels if isinstance(num_channels, int) and not isinstance(num_channels, bool) else -1,
            DECOR_KINDS.index(kind) if kind in DECOR_KINDS else -1,
            LAST_GROUPS.index(last_group) if last_group in LAST_GROUPS else -1,
            m if shaped else -1]


def _header_device(group, x) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if any(name in backend for name in ("gloo", "mpi", "ucc")):
        return torch.device("cpu")
    if isinstance(x, Tensor) and x.device.type != "cpu":
        return x.device
    return torch.device("cuda", torch.cuda.current_device())


def exchange_header(row: list[int], group, x) -> list[list[int]]:
    """Every rank's row (W lists, in rank order), from one all_reduce (max)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    table = torch.full((world, len(row)), _ABSENT, dtype=torch.int64)
    table[rank] = torch.tensor(row, dtype=torch.int64)
    table = table.to(_header_device(group, x))
    dist.all_reduce(table, op=dist.ReduceOp.MAX, group=group)
    return table.tolist()


def check_header(table: list[list[int]], caller: str) -> int:
    """n, the number of values per channel on all ranks together, once the ranks agree; else the same
    ValueError on every rank (``caller`` names the function in the message)."""
    ranks = list(range(len(table)))
    col = {name: [row[i] for row in table] for i, name in enumerate(_FIELDS)}
    failed = [r for r in ranks if col["passed"][r] != 1]
    if failed:
        raise ValueError(
            f"{caller} with a process group: the arguments on rank{'s' * (len(failed) > 1)} "
            f"{', '.join(map(str, failed))} failed their checks (the error is raised there), so no rank "
            f"computes the loss; channel counts C per rank: {_listed(col['C'])}")
    names = {"kind": DECOR_KINDS, "last_group": LAST_GROUPS}
    differ = []
    for field in ("C", "num_channels", "kind", "last_group"):
        values = col[field]
        if len(set(values)) > 1:
            shown = [names[field][v] for v in values] if field in names else values
            differ.append(f"{'channel counts C' if field == 'C' else field} {_listed(shown)}")
    if differ:
        raise ValueError(
            f"{caller} with a process group: every rank must pass features of the same channel count C, "
            f"with the same num_channels, kind and last_group; got {'; '.join(differ)} on ranks "
            f"{_listed(ranks)}")
    n = sum(col["m"])
    if n < 2:
        raise ValueError(
            f"{caller} with a process group: training statistics need more than 1 value per channel over "
            f"all ranks together (m = N * prod(S), summed over the ranks, >= 2); got m = {_listed(col['m'])} "
            f"on ranks {_listed(ranks)}")
    return n


def _listed(values) -> str:
    return ", ".join(repr(v) if isinstance(v, str) else str(v) for v in values)


# ---------------------------------------------------------------------------------------------------
# the statistics


def parts(x: Tensor, num_channels: int) -> list[tuple[Tensor, int]]:
    """(channels, group size) of each part of x: the whole, or with a smaller last group of r
    channels the full groups' channels (none when C < d) and the last group's."""
    x_even, x_last, r = split_channels(x, num_channels)
    if r == num_channels:
        return [(x, num_channels)]
    return [(x_even, num_channels)] * bool(x_even.shape[1]) + [(x_last, r)]


def _common_scale(pieces: list[tuple[Tensor, int]], group) -> list[Tensor]:
    """Each part's channels (float64) divided by the power of two per group that brings max |x| of all
    ranks below 2^48 (1 wherever it already is), detached: one all_reduce (max) of the exponents."""
    exps = []
    for xp, dp in pieces:
        xg = grouped(xp.detach(), dp)                                # (N, G, d, L)
        if xg.numel():
            e = torch.frexp(xg.abs().amax(dim=(0, 2, 3))).exponent - CORR_MAX_EXP
        else:                                                        # no samples on this rank
            e = torch.zeros(xg.shape[1], dtype=torch.int32, device=xp.device)
        exps.append(e.clamp(0, 1022).to(torch.int64))
    e = torch.cat(exps)
    dist.all_reduce(e, op=dist.ReduceOp.MAX, group=group)
    out, at = [], 0
    for xp, dp in pieces:
        G = -(-xp.shape[1] // dp)
        scale = power_of_two(-e[at:at + G], torch.float64).repeat_interleave(dp)      # (C_part,)
        out.append(xp * scale.reshape((1, -1) + (1,) * (xp.dim() - 2)))
        at += G
    return out


def global_cov(pieces: list[tuple[Tensor, int]], n: int, group, *, common_scale: bool = False,
               grad_scale: float = 1.0) -> list[Tensor]:
    """The covariance (G, d, d) of each part (see :func:`parts`) over all ranks' samples, float64,
    differentiable w.r.t. this rank's x (see the module docstring: gradient of the loss w.r.t. this
    rank's x, times ``grad_scale``). ``n``: the total count from :func:`check_header`;
    ``common_scale``: each group divided by a power of two common to all ranks (kind "corr" on
    float64 input)."""
    xs = [xp.to(torch.float64) for xp, _ in pieces]
    if common_scale:
        xs = _common_scale([(xp, dp) for xp, (_, dp) in zip(xs, pieces)], group)
    local = []
    for xp, (_, dp) in zip(xs, pieces):
        xg = grouped(xp, dp)                                         # (N, G, d, L)
        xg = xg.permute(1, 2, 0, 3).reshape(xg.shape[1], dp, -1)     # (G, d, m)
        local += [xg.sum(-1).reshape(-1), (xg @ xg.transpose(-1, -2)).reshape(-1)]
    local = torch.cat(local)                                         # sum x, sum x x^T of each part
    summed = local.detach().clone()
    dist.all_reduce(summed, group=group)
    delta = local - local.detach()                                   # 0, with the gradient of local
    summed = summed + (delta if grad_scale == 1 else grad_scale * delta)
    covs, at = [], 0
    for xp, (_, dp) in zip(xs, pieces):
        G = -(-xp.shape[1] // dp)
        s1 = summed[at:at + G * dp].reshape(G, dp)
        at += G * dp
        s2 = summed[at:at + G * dp * dp].reshape(G, dp, dp)
        at += G * dp * dp
        mean = s1 / n
        covs.append(s2 / n - mean.unsqueeze(-1) * mean.unsqueeze(-2))
    return covs
