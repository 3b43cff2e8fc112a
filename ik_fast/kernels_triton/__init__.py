"""The ``"triton"`` implementation of the op layer (:mod:`ik_fast.ops`): fused Triton kernels and their launchers.

``conv`` (the trunk kernels), ``contract`` (the per-receiver contraction), ``blocks`` (W''s block plan) and ``launch``
(padding, precision and the registration of the kernels for the ``ik_fast::triton_*`` ops). Importing ``launch``
needs Triton; without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors).
"""
