"""The ops, one module per family, and one module per other backend of a family.

- ``ops/<family>.py``: the public functions (arguments checked once, backend picked from the
  module's ``SUPPORTS`` table, dispatched), and the torch.library custom ops of the ``triton``
  backend with their autograd (one namespace, :mod:`sdecor.ops._library`);
- ``ops/<family>_torch.py``: the ``torch`` backend where it is more than the reference (torch ops,
  hand-written backward);
- ``ops/<family>_native.py``: the ``native`` backend, the Python side of the C++ ops of ``sdecor._C``
  (the autograd around ``torch.ops.sdecor.native_*`` and ``eigh_small``).

Families:

- :mod:`sdecor.ops.cov`: group_cov; native :mod:`sdecor.ops.cov_native`; torch: the reference
- :mod:`sdecor.ops.whiten`: whitening_matrix, group_whiten, group_whiten_train / group_whiten_eval
  (the GroupWhitening paths); torch :mod:`sdecor.ops.whiten_torch` (its d x d part in
  :mod:`sdecor.ops.whiten_scaled_torch`), native
  :mod:`sdecor.ops.whiten_native`; the passes of the training paths share the interface of
  :mod:`sdecor.ops._whiten_passes`; statistics synchronised over torch.distributed (SyncGroupWhitening)
  in :mod:`sdecor.ops.whiten_sync`
- :mod:`sdecor.ops.topk`: topk_mask; torch :mod:`sdecor.ops.topk_torch`, native
  :mod:`sdecor.ops.topk_native` (the C++ op ``sdecor::native_topk_mask``, ``csrc/topk_cpu.cpp``, with
  the triton op's autograd, registered when the extension loads)

Every custom op is ``torch.ops.sdecor.<name>``, registered through :mod:`sdecor.ops._library` on its
first call; :func:`register_custom_ops` registers them all at once (before ``torch.export.load`` of a
program that holds them).
"""

from ._library import register_custom_ops
from .cov import group_cov
from .topk import topk_mask
from .whiten import group_whiten, group_whiten_eval, group_whiten_train, whitening_matrix

__all__ = ["group_cov", "group_whiten", "group_whiten_eval", "group_whiten_train", "register_custom_ops",
           "topk_mask", "whitening_matrix"]
