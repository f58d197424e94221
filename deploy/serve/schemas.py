"""The wire format, declared once: requests and responses of the OpenAI API as llama.cpp and vLLM
serve it, plus our ``nsn`` request and response objects.

A field the OpenAI API defines but this server does not implement (``n`` > 1, ``logprobs``,
penalties, ``suffix``, ...) is accepted only at its neutral value; anything else, and any unknown
field, is a 400 that names the field — never silently ignored.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# A prompt or an input: text, a list of texts, token ids, or a list of token-id lists.
TokenIds = list[int]
PromptInput = Union[str, list[str], TokenIds, list[TokenIds]]


# OpenAI fields without an implementation here: accepted only at their neutral value.
NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "presence_penalty": 0.0, "frequency_penalty": 0.0}
ABSENT = ("logprobs", "logit_bias", "suffix", "dimensions")


class Strict(BaseModel):
    """Unknown fields are refused, and unimplemented ones at anything but their neutral value."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def implemented(cls, value, info):
        name = info.field_name
        if name in NEUTRAL and value is not None and value != NEUTRAL[name]:
            raise ValueError(f"{name} = {value!r} is not supported by this server (only {NEUTRAL[name]!r})")
        if name in ABSENT and value not in (None, False, 0, {}, ""):
            raise ValueError(f"{name} = {value!r} is not supported by this server")
        return value


class NSNOptions(Strict):
    """``nsn`` in a request body (the OpenAI client sends it through ``extra_body``)."""

    max_rank: int | None = Field(None, ge=1, description="never run this request above this rank")
    min_rank: int | None = Field(None, ge=1, description="refuse (503) rather than run below this rank")


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingRequest(Strict):
    """What completions and chat completions share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # metadata: accepted, not used
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks)
    nsn: NSNOptions | None = None
    n: int | None = None
    logprobs: bool | int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None

    @field_validator("stop")
    @classmethod
    def stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("temperature", "top_p")
    @classmethod
    def finite(cls, value, info):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{info.field_name} must be a finite number")
        return value


class CompletionRequest(SamplingRequest):
    prompt: PromptInput
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id ...: passed to the template

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class EmbeddingRequest(Strict):
    model: str | None = None
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # embeddings have the model's size
    user: str | None = None
    nsn: NSNOptions | None = None


class OverrideRequest(Strict):
    """``POST /v1/nsn/override``: cap the device's rank ceiling by hand (None releases it)."""

    rank: int | None = Field(None, ge=1)
