"""The ops, one module per family: public functions (arguments checked once, backend picked from the
module's ``SUPPORTS`` table), the torch.library custom ops of the ``triton`` backend with their
autograd, and the torch backends beside them.

- :mod:`sdecor.ops.cov`: group_cov
- :mod:`sdecor.ops.whiten`: whitening_matrix, group_whiten, group_whiten_train / group_whiten_eval
  (the GroupWhitening paths); torch backend :mod:`sdecor.ops.whiten_torch`
- :mod:`sdecor.ops.topk`: topk_mask; torch backend :mod:`sdecor.ops.topk_torch`; native backend the C++
  op ``sdecor::native_topk_mask`` (``csrc/topk_cpu.cpp``), its autograd registered here when the
  extension loads

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
