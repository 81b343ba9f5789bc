"""torch.library custom ops (importing this package registers them)."""

from .triton_attention import triton_attention

__all__ = ["triton_attention"]
