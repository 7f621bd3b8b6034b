"""The serving engine: paged compressed cache, continuous batching, sampling."""
from .async_engine import AsyncEngine
from .config import EngineArgs
from .llm import LLM
from .llm_engine import LLMEngine
from .outputs import CompletionOutput, ContextLengthExceeded, EngineStats, QueueFull, RequestOutput, StreamDelta
from .sampling_params import SamplingParams

__all__ = ["LLM", "AsyncEngine", "CompletionOutput", "ContextLengthExceeded", "EngineArgs", "EngineStats",
           "LLMEngine", "QueueFull", "RequestOutput", "SamplingParams", "StreamDelta"]
