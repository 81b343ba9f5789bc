"""``pk.patch(model)``: run the attention of existing Perceiver models on ``perceiver_kernels.attention``.

``patch`` walks the module tree and, for every attention module it knows, replaces the attention core
(scores, softmax, weighted sum) with :func:`perceiver_kernels.attention`, in place and per instance: the
patched module gets an instance attribute ``forward`` that shadows its class's ``forward``, so the class,
and every other instance of it in the process, keep running their original code. The projections,
norms and output layers of the module are the module's own parameters, used exactly as before.
``unpatch`` deletes that attribute again (the module is then exactly as it was).

One module per library, each declaring the classes it patches and their replacement forwards
(``INTEGRATIONS``), listed once in ``registry.py``; what each falls back on and why: docs/INTEGRATIONS.md.

* ``transformers_perceiver``: Hugging Face ``PerceiverSelfAttention`` (every Perceiver model and head);
* ``perceiver_pytorch``: lucidrains' ``Attention`` of ``Perceiver`` and ``PerceiverIO``;
* ``perceiver_ar_pytorch``: lucidrains' ``CausalPrefixAttention``, ``CausalAttention`` and the tables of
  ``RotaryEmbedding`` of ``PerceiverAR``;
* ``models``: ``perceiver_kernels.models.MultiHeadAttention``, whose ``backend`` attribute is set.

The mechanism (``core``): a patched module calls its original forward, unchanged, whenever a call asks
for something the kernels cannot reproduce exactly (attention probabilities, dropout on the
probabilities, a mask that is not a key-padding mask, ...); every call is counted either way (see
:func:`patch_status`).
"""

from .core import patch, patch_status, unpatch
from .report import LeftModule, PatchedModule, PatchReport

__all__ = ["LeftModule", "PatchReport", "PatchedModule", "patch", "patch_status", "unpatch"]
