"""torch.library custom ops (importing this package registers them)."""

from .rotary import rotary
from .triton_attention import triton_attention

__all__ = ["rotary", "triton_attention"]
