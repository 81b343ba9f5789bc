"""A thin Perceiver / Perceiver IO / Perceiver AR model layer on ``pk.attention`` (perceiver-io's module
names, parameters and semantics). Every module takes ``backend=`` and runs on CPU with ``"reference"``."""

from .adapters import (
    ClassificationOutputAdapter,
    InputAdapter,
    OutputAdapter,
    QueryProvider,
    RotarySupport,
    TiedTokenOutputAdapter,
    TokenInputAdapter,
    TrainableQueryProvider,
)
from .ar import CausalSequenceModel, PerceiverAR, PerceiverARCache, sequence_positions
from .attention import CrossAttention, MultiHeadAttention, RotaryPositions, SelfAttention
from .config import CausalSequenceModelConfig, DecoderConfig, EncoderConfig, PerceiverARConfig
from .layers import MLP, CrossAttentionLayer, Residual, SelfAttentionBlock, SelfAttentionLayer
from .perceiver import PerceiverDecoder, PerceiverEncoder, PerceiverIO
from .shared import run_shared_chain

__all__ = [
    "MLP",
    "CausalSequenceModel",
    "CausalSequenceModelConfig",
    "ClassificationOutputAdapter",
    "CrossAttention",
    "CrossAttentionLayer",
    "DecoderConfig",
    "EncoderConfig",
    "InputAdapter",
    "MultiHeadAttention",
    "OutputAdapter",
    "PerceiverAR",
    "PerceiverARCache",
    "PerceiverARConfig",
    "PerceiverDecoder",
    "PerceiverEncoder",
    "PerceiverIO",
    "QueryProvider",
    "Residual",
    "RotaryPositions",
    "RotarySupport",
    "SelfAttention",
    "SelfAttentionBlock",
    "SelfAttentionLayer",
    "TiedTokenOutputAdapter",
    "TokenInputAdapter",
    "TrainableQueryProvider",
    "run_shared_chain",
    "sequence_positions",
]
