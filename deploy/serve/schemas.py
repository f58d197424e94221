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


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NSNOptions(Strict):
    """``nsn`` in a request body (the OpenAI client sends it through ``extra_body``)."""

    max_rank: int | None = Field(None, ge=1, description="never run this request above this rank")
    min_rank: int | None = Field(None, ge=1, description="refuse (503) rather than run below this rank")


class StreamOptions(Strict):
    include_usage: bool = False


def only_neutral(name: str, value, neutral) -> None:
    if value is not None and value != neutral:
        raise ValueError(f"{name} = {value!r} is not supported by this server (only {neutral!r})")


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
    # OpenAI fields without an implementation here: only their neutral value is accepted.
    n: int | None = None
    logprobs: bool | int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None

    @field_validator("n")
    @classmethod
    def one_choice(cls, value):
        only_neutral("n", value, 1)
        return value

    @field_validator("logprobs")
    @classmethod
    def no_logprobs(cls, value):
        if value not in (None, False, 0):
            raise ValueError(f"logprobs = {value!r} is not supported by this server")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def no_penalty(cls, value, info):
        only_neutral(info.field_name, value, 0.0)
        return value

    @field_validator("logit_bias")
    @classmethod
    def no_bias(cls, value):
        if value:
            raise ValueError("logit_bias is not supported by this server")
        return value

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

    @field_validator("echo")
    @classmethod
    def no_echo(cls, value):
        only_neutral("echo", value, False)
        return value

    @field_validator("best_of")
    @classmethod
    def one_best(cls, value):
        only_neutral("best_of", value, 1)
        return value

    @field_validator("suffix")
    @classmethod
    def no_suffix(cls, value):
        if value:
            raise ValueError("suffix is not supported by this server")
        return value


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
    dimensions: int | None = None
    user: str | None = None
    nsn: NSNOptions | None = None

    @field_validator("dimensions")
    @classmethod
    def full_dimensions(cls, value):
        if value is not None:
            raise ValueError("dimensions is not supported by this server: embeddings have the model's size")
        return value


class OverrideRequest(Strict):
    """``POST /v1/nsn/override``: cap the device's rank ceiling by hand (None releases it)."""

    rank: int | None = Field(None, ge=1)
