"""Text generation: GenerationConfig, logits processors, samplers, stopping rules, streamers and the generate loop."""
from .config import DEFAULT_MAX_NEW_TOKENS, GenerationConfig, GenerationConfigError
from .processors import (
    LogitsProcessor,
    MinNewTokens,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    VocabLimit,
    apply_processors,
    build_processors,
)
from .generate import chat, generate
from .sampling import greedy, make_rng, sample
from .stopping import StopState, StopStrings
from .streamers import CallbackStreamer, IncrementalDecoder, TextStreamer, as_streamer

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "GenerationConfig",
    "GenerationConfigError",
    "LogitsProcessor",
    "RepetitionPenalty",
    "Temperature",
    "TopK",
    "TopP",
    "MinNewTokens",
    "VocabLimit",
    "apply_processors",
    "build_processors",
    "greedy",
    "sample",
    "make_rng",
    "StopState",
    "StopStrings",
    "IncrementalDecoder",
    "TextStreamer",
    "CallbackStreamer",
    "as_streamer",
    "generate",
    "chat",
]
