"""The serving engine: paged compressed cache, continuous batching, sampling."""
from .config import EngineArgs
from .llm import LLM
from .llm_engine import LLMEngine
from .outputs import CompletionOutput, ContextLengthExceeded, EngineStats, QueueFull, RequestOutput, StreamDelta
from .sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "ContextLengthExceeded", "EngineArgs", "EngineStats", "LLMEngine",
           "QueueFull", "RequestOutput", "SamplingParams", "StreamDelta"]
from .async_engine import AsyncEngine  # noqa: E402

__all__.append("AsyncEngine")
