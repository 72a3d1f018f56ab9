"""Typed errors. Every failure a user can cause raises one of these, with a message naming the problem."""

from __future__ import annotations


class RapidLMError(Exception):
    """Base class of every error rapidlm raises on purpose."""


class ModelNotFoundError(RapidLMError, FileNotFoundError):
    """The model path or alias does not exist."""


class ModelFormatError(RapidLMError, ValueError):
    """The model file exists but is truncated, corrupt, or missing something it needs."""


class UnsupportedArchitectureError(RapidLMError, ValueError):
    """The checkpoint names an architecture (or a feature of one) that rapidlm has no model code for."""


class ConfigError(RapidLMError, ValueError):
    """A configuration field holds a bad value; the message names the field."""


class InvalidSamplingParamsError(ConfigError):
    """A SamplingParams field holds a bad value."""


class PromptTooLongError(RapidLMError, ValueError):
    """The prompt (plus the tokens asked for) does not fit in the model's context."""


class DeviceError(RapidLMError, RuntimeError):
    """The requested device or dtype is not available here."""


class EngineFullError(RapidLMError, RuntimeError):
    """The engine already holds as many running and queued requests as it is configured for."""


class EngineStoppedError(RapidLMError, RuntimeError):
    """The engine is draining or stopped and admits no new requests."""
