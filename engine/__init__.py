"""The serving engine: paged compressed cache, continuous batching, sampling."""
from .async_engine import AsyncEngine
from .config import EngineArgs
from .errors import ContextLengthExceeded, EngineDead, InvalidPrompt, InvalidRequest, QueueFull, RequestRejected
from .llm import LLM
from .llm_engine import LLMEngine
from .outputs import CompletionOutput, EngineStats, RequestOutput, StreamDelta
from .sampling_params import SamplingParams

__all__ = ["LLM", "AsyncEngine", "CompletionOutput", "ContextLengthExceeded", "EngineArgs", "EngineDead",
           "EngineStats", "InvalidPrompt", "InvalidRequest", "LLMEngine", "QueueFull", "RequestOutput",
           "RequestRejected", "SamplingParams", "StreamDelta"]
