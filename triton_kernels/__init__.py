"""Triton kernels of the l2fx runtime (installed as ``l2fx.triton_kernels``).

* :mod:`.packing` - the in-memory packed-code format the kernels read.
* :mod:`.dequant_matmul` - fused decode + matmul, registered as ``torch.ops.l2fx.dequant_matmul``.

Importing this package imports neither submodule: ``dequant_matmul`` registers a custom op
and decorates Triton kernels (which reads ``TRITON_INTERPRET``) at import time.
"""
