"""Raw Triton kernels and their launchers. Nothing here is imported at package import time except
``configs`` (``@triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is defined)."""
