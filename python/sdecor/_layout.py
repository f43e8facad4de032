"""The layout of channel groups, written once for the reference and every backend.

x (N, C, *S) holds C channels in groups of d (``num_channels``): G = ceil(C / d) groups, group g the
channels [g*d, (g+1)*d), the last one of ``last`` = C - (G - 1) d channels (d when d divides C; with
``last_group="smaller"`` it may hold fewer, IterNorm's flexible groups). Per-group values (G,),
(G, d) or (G, d, d) keep the padded layout: a smaller last group in the top-left block of its entry,
zeros in the padding.

Here: :func:`group_layout` / :func:`group_sizes` (G and the size of the last group), the (N, G, d, L)
view of x, the split of x and of per-group values into the full groups and a smaller last group
(:func:`split_channels`, :func:`split_groups`, :func:`join_groups`, :func:`by_part`), per-channel <->
per-group vectors, the channel mask of the padding (:func:`zero_padding` selects it away: padded
entries are never multiplied by 0, which keeps a NaN there), and the output memory format
(:func:`like_format`).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "by_part",
    "channel_mask",
    "group_layout",
    "group_sizes",
    "grouped",
    "join_groups",
    "joined_parts",
    "last_group_mask",
    "like_format",
    "per_channel",
    "per_group",
    "samples_per_channel",
    "split_channels",
    "split_groups",
    "zero_padding",
]


def group_layout(C: int, d: int) -> tuple[int, int]:
    """(G, last): C channels in G = ceil(C / d) groups of d, the last one of last = C - (G - 1) d
    channels (last = d when d divides C)."""
    G = -(-C // d)
    return G, C - (G - 1) * d


def group_sizes(C: int, d: int) -> list[int]:
    """The channels of every group of :func:`group_layout`: d for all but the last, which holds the rest."""
    G, last = group_layout(C, d)
    return [d] * (G - 1) + [last]


def samples_per_channel(x: torch.Tensor) -> int:
    """m = N * prod(S)."""
    return x.shape[0] * math.prod(x.shape[2:])


def grouped(x: torch.Tensor, num_channels: int) -> torch.Tensor:
    """View x (N, C, *S) as (N, G, d, L) with L = prod(S) (copies only for non-contiguous x)."""
    N, C = x.shape[:2]
    return x.reshape(N, C // num_channels, num_channels, math.prod(x.shape[2:]))


def split_channels(x: torch.Tensor, num_channels: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(x_even, x_last, r): the channels of the G - 1 full groups of d and those of the last group,
    r of them (:func:`group_layout`; r = d when d divides C), as views of x (N, C, *S).

    With a smaller last group (IterNorm's flexible groups) it is whitened as a group of its own:
    the paths that work on the (N, G, d, L) view of x run on each part (x_even has 0 channels when
    C <= d)."""
    C = x.shape[1]
    r = group_layout(C, num_channels)[1]
    return x[:, :C - r], x[:, C - r:], r


def split_groups(t: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group values of G groups of d in the padded layout, (G,), (G, d) or (G, d, d), as (those
    of the G - 1 full groups, the last group's (1,), (1, r) or (1, r, r) block)."""
    return t[:-1], t[(slice(-1, None),) + (slice(None, r),) * (t.dim() - 1)]


def join_groups(even: torch.Tensor | None, last: torch.Tensor, d: int) -> torch.Tensor:
    """The inverse of :func:`split_groups`: the G - 1 full groups' values (None: no full group) and
    the last group's as (G,), (G, d) or (G, d, d), its block top-left and zeros in its padding
    (differentiable)."""
    if last.dim() > 1:
        last = torch.nn.functional.pad(last, [0, d - last.shape[-1]] * (last.dim() - 1))
    return last if even is None else torch.cat([even, last])


def by_part(d: int, fn, channels: list, groups: list) -> list:
    """fn(d_part, *channels_part, *groups_part) for each part of the channels: the full groups' and
    the last group's when it is smaller (the passes over x of the torch and native backends work on
    groups of d | C channels, which then do not exist), else the whole. ``channels``: tensors
    (N, C, *S) split along dim 1 (views); ``groups``: per-group tensors (G, ...) in the padded
    layout, split by :func:`split_groups`. Returns [the result] without a smaller last group, else
    [the full groups' result (None when C < d), the last group's]."""
    x_even, _, r = split_channels(channels[0], d)
    if r == d:
        return [fn(d, *channels, *groups)]
    ce = x_even.shape[1]
    split = [split_groups(t, r) for t in groups]
    even = fn(d, *[t[:, :ce] for t in channels], *[s[0] for s in split]) if ce else None
    return [even, fn(r, *[t[:, ce:] for t in channels], *[s[1] for s in split])]


def joined_parts(results: list, d: int) -> tuple:
    """The per-group results of :func:`by_part`'s parts in the padded layout."""
    if len(results) == 1:
        return results[0]
    even, last = results
    even = (None,) * len(last) if even is None else even
    return tuple(join_groups(e, t, d) for e, t in zip(even, last))


def per_group(t: torch.Tensor, G: int, d: int) -> torch.Tensor:
    """A per-channel vector (C,) as (G, d), zeros in the padding of a smaller last group."""
    C = t.shape[0]
    return (t if C == G * d else torch.nn.functional.pad(t, (0, G * d - C))).reshape(G, d)


def per_channel(t: torch.Tensor, C: int) -> torch.Tensor:
    """The inverse of :func:`per_group`: (G, d) as the (C,) values of the channels that exist."""
    return t.reshape(-1)[:C]


def channel_mask(G: int, d: int, C: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(G, d): 1 for the channels of the groups that exist, 0 for the padding of a smaller last group
    (channel g d + i exists when g d + i < C)."""
    return (torch.arange(G * d, device=device) < C).reshape(G, d).to(dtype)


def last_group_mask(like: torch.Tensor, C: int) -> torch.Tensor | None:
    """The channels (G, d) of the groups of per-group values ``like`` (G, d) or (G, d, d) for C
    channels, as a bool mask on like's device (True where the channel exists, :func:`channel_mask`);
    None when d divides C (no padding)."""
    G, d = like.shape[0], like.shape[-1]
    return None if C == G * d else torch.arange(G * d, device=like.device).reshape(G, d) < C


def zero_padding(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-group values t (G, d) or (G, d, d) with the padding of a smaller last group (``mask``
    False, :func:`last_group_mask`; rows and columns for (G, d, d)) set to zero. Selected, never
    multiplied by 0: whatever the padding holds (NaN from uninitialised memory, inf) does not leak
    into the values that exist (0 * NaN is NaN)."""
    if mask is None:
        return t
    keep = mask if t.dim() == 2 else mask.unsqueeze(-1) & mask.unsqueeze(-2)
    return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))


def like_format(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return y (contiguous, shaped like x) in x's memory format (channels_last where x is)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return y.contiguous(memory_format=torch.channels_last_3d)
    return y
