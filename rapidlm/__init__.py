"""rapidlm: fast LLM inference and compression on the hardware people have."""

from rapidlm.config import ModelConfig
from rapidlm.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, StreamChunk
from rapidlm.engine.sampling import SamplingParams
from rapidlm.errors import (
    ConfigError,
    DeviceError,
    InvalidSamplingParamsError,
    ModelFormatError,
    ModelNotFoundError,
    PromptTooLongError,
    RapidLMError,
    UnsupportedArchitectureError,
)
from rapidlm.llm import LLM
from rapidlm.loading import load_model

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CompletionOutput",
    "ConfigError",
    "DeviceError",
    "InvalidSamplingParamsError",
    "ModelConfig",
    "ModelFormatError",
    "ModelNotFoundError",
    "PromptTooLongError",
    "RapidLMError",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "StreamChunk",
    "UnsupportedArchitectureError",
    "load_model",
]
