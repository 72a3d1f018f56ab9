"""The wire format: pydantic models of the OpenAI-compatible requests and responses.

These models are the server's contract. FastAPI validates every request body against them (a body that does
not fit is a 422 naming the field) and they produce the OpenAPI schema that clients and fuzzers read, so every
field carries the constraint the server really enforces. What the schema cannot say (n > 1, a prompt longer
than the context) is checked by the app and answered 400.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

# Bounds shared by both endpoints (OpenAI's, where it documents them).
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 4
# Within what torch.Generator.manual_seed accepts ([-2**63, 2**64)); the top is the largest double below 2**64,
# so a client or validator comparing as floats draws the line at the same place.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 2**12

# Bounds that depend on the model (vocabulary size, context length) are marked here and filled in by
# bind_model_limits when the app builds its OpenAPI schema; the app checks them itself (answering 400).
TOKEN_ID, CONTEXT_BOUND, MODEL_NAME = "token-id", "context-bound", "model-name"
_MARK = "x-rapidlm-bound"

TokenId = Annotated[int, Field(ge=0, json_schema_extra={_MARK: TOKEN_ID})]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
StopString = Annotated[str, Field(min_length=1)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None
# One prompt (text or token ids) or a batch of them; a batch answers with one choice per prompt.
PromptText = Annotated[str, Field(min_length=1)]
Prompt = (
    PromptText
    | TokenIds
    | Annotated[list[PromptText], Field(min_length=1)]
    | Annotated[list[TokenIds], Field(min_length=1)]
)

# Options OpenAI has and rapidlm refuses with a 400 unless left at their neutral value: the schema states the
# neutral value only (JSON Schema keywords beside pydantic's own), the model accepts OpenAI's range so that
# the answer is a 400 saying "not supported" rather than a 422 about the range.
_ONLY_ONE = {"maximum": 1}
_ONLY_ZERO = {"minimum": 0, "maximum": 0}


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value


def _field_error(param: str, message: str) -> PydanticCustomError:
    """A cross-field check's error, carrying the field to name in the answer's `param`."""
    return PydanticCustomError("value_error", "{param}: " + message, {"param": param})


class _Strict(BaseModel):
    # Unknown fields are refused (422 naming them), as OpenAI does: a misspelt parameter silently ignored
    # would generate with settings the client did not ask for.
    # Strict types: "0.5" is not a temperature and 0 is not `false`; a client sending those has a bug to hear about.
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_floats_are_ints(cls, data: Any) -> Any:
        # JSON Schema counts 3.0 as an integer, and some clients write every number as a float. Turning
        # every integral float into an int is safe everywhere: a float field takes an int in strict mode too.
        return _integral(data)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields both endpoints share. Extensions beyond OpenAI's (top_k, repetition_penalty, ignore_eos,
    stop_token_ids) use vLLM's names."""

    model: str = Field(min_length=1, max_length=256, json_schema_extra={_MARK: MODEL_NAME})
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=1_000_000, description="-1 or 0 = off")
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=10)
    presence_penalty: float | None = Field(
        default=None, ge=-2, le=2, description="only 0 is supported", json_schema_extra=_ONLY_ZERO
    )
    frequency_penalty: float | None = Field(
        default=None, ge=-2, le=2, description="only 0 is supported", json_schema_extra=_ONLY_ZERO
    )
    logit_bias: dict[str, float] | None = Field(
        default=None, description="not supported: must be empty", json_schema_extra={"maxProperties": 0}
    )
    n: int = Field(default=1, ge=1, description="only 1 is supported", json_schema_extra=_ONLY_ONE)
    seed: int | None = Field(default=None, ge=_SEED_MIN, le=_SEED_MAX)
    stop: Stop = None
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=64)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)


_STREAM_OPTIONS_NEED_STREAM = {
    "if": {"properties": {"stream": {"const": False}}},
    "then": {"properties": {"stream_options": {"type": "null"}}},
}


class CompletionRequest(_SamplingFields):
    # The cross-field rules, in the schema too, so that a fuzzer knows them.
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {
                    "if": {"properties": {"max_tokens": {"const": 0}}, "required": ["max_tokens"]},
                    "then": {"properties": {"echo": {"const": True}}, "required": ["echo"]},
                },
                _STREAM_OPTIONS_NEED_STREAM,
            ]
        }
    )

    prompt: Prompt
    max_tokens: int | None = Field(
        default=16,
        ge=0,
        description="0 only with echo: score the prompt alone",
        json_schema_extra={_MARK: CONTEXT_BOUND},
    )
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, description="only 1 is supported", json_schema_extra=_ONLY_ONE)
    suffix: str | None = Field(default=None, description="not supported", json_schema_extra={"maxLength": 0})

    @model_validator(mode="after")
    def _max_tokens_zero_needs_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise _field_error("max_tokens", "0 is only allowed with echo=true (scoring the prompt alone)")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = Field(default=None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {
                    "if": {"properties": {"logprobs": {"const": False}}},
                    "then": {"properties": {"top_logprobs": {"type": "null"}}},
                },
                _STREAM_OPTIONS_NEED_STREAM,
            ]
        }
    )

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(
        default=None, ge=1, description="default: the rest of the context", json_schema_extra={_MARK: CONTEXT_BOUND}
    )
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="newer name of max_tokens", json_schema_extra={_MARK: CONTEXT_BOUND}
    )
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise _field_error("top_logprobs", "needs logprobs=true")
        return self


# ---- responses ------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy format. With echo it covers the prompt's tokens (the first has no logprob: None),
    then the generated ones; top_logprobs maps token text to logprob and includes the chosen token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = Field(default=None, description="the stop string or token id that ended it")


def _now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "rapidlm"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str


# ---- errors ---------------------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# The `type` OpenAI's clients expect for each status (they branch on the status, people read the type).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered to the client as {"error": {...}} with `status`. Raised anywhere in a request."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(
            message=self.message,
            type=ERROR_TYPES.get(self.status, "invalid_request_error"),
            param=self.param,
            code=self.code,
        )
        return ErrorResponse(error=info).model_dump()


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries documenting the error statuses a route can answer."""
    return {s: {"model": ErrorResponse, "description": ERROR_TYPES.get(s, "error")} for s in statuses}


def bind_model_limits(schema: Any, model_name: str, vocab_size: int, max_model_len: int) -> None:
    """Fill the model-dependent bounds into an OpenAPI schema in place (the served model's name, token ids
    < vocab_size, max_tokens <= max_model_len), so the schema states what the server will accept."""
    if isinstance(schema, dict):
        mark = schema.pop(_MARK, None)
        if mark == TOKEN_ID:
            schema["maximum"] = vocab_size - 1
        elif mark == CONTEXT_BOUND:
            schema["maximum"] = max_model_len
        elif mark == MODEL_NAME:
            schema["enum"] = [model_name]
        for value in schema.values():
            bind_model_limits(value, model_name, vocab_size, max_model_len)
    elif isinstance(schema, list):
        for value in schema:
            bind_model_limits(value, model_name, vocab_size, max_model_len)
