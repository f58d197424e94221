"""The wire format, declared once: requests and responses of the OpenAI API as llama.cpp and vLLM
serve it, plus our ``nsn`` request and response objects.

A field the OpenAI API defines but this server does not implement (``n`` > 1, ``logprobs``,
penalties, ``suffix``, ...) is accepted only at its neutral value; anything else, and any unknown
field, is a 400 that names the field — never silently ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

from ..runtime import MAX_TEMPERATURE, MIN_TEMPERATURE

# Counts and token ids are strict integers (JSON true is never the token 1 or a max_tokens of 1);
# numbers are finite.
TokenIds = list[StrictInt]
PromptInput = Union[str, list[str], TokenIds, list[TokenIds]]
Finite = Annotated[StrictFloat, Field(allow_inf_nan=False)]
SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(value, name: str):
    """Refuse lone UTF-16 surrogates anywhere in ``value`` (JSON allows "\\ud800"; no tokenizer reads it)."""
    if isinstance(value, str):
        found = SURROGATE.search(value)
        if found:
            raise ValueError(f"{name} holds a lone surrogate (\\u{ord(found.group()):04x} at character "
                             f"{found.start()}), which is not text; send valid UTF-8")
    elif isinstance(value, (list, tuple)):
        for item in value:
            valid_text(item, name)
    elif isinstance(value, dict):
        for key, item in value.items():
            valid_text(key, name)
            valid_text(item, name)
    elif isinstance(value, BaseModel):
        valid_text(value.model_dump(), name)
    return value


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
        valid_text(value, name)
        if name in NEUTRAL and value is not None and value != NEUTRAL[name]:
            raise ValueError(f"{name} = {value!r} is not supported by this server (only {NEUTRAL[name]!r})")
        if name in ABSENT and value not in (None, False, 0, {}, ""):
            raise ValueError(f"{name} = {value!r} is not supported by this server")
        return value


class NSNOptions(Strict):
    """``nsn`` in a request body (the OpenAI client sends it through ``extra_body``)."""

    max_rank: StrictInt | None = Field(None, ge=1, description="never run this request above this rank")
    min_rank: StrictInt | None = Field(None, ge=1, description="refuse (503) rather than run below this rank")


class StreamOptions(Strict):
    include_usage: StrictBool = False


class SamplingRequest(Strict):
    """What completions and chat completions share."""

    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Finite = Field(1.0, ge=0, le=MAX_TEMPERATURE)
    top_p: Finite = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0)
    seed: StrictInt | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # metadata: accepted, not used
    ignore_eos: StrictBool = False  # vLLM's extension: run to max_tokens (benchmarks)
    nsn: NSNOptions | None = None
    n: StrictInt | None = None
    logprobs: StrictBool | StrictInt | None = None
    presence_penalty: Finite | None = None
    frequency_penalty: Finite | None = None
    logit_bias: dict | None = None

    @field_validator("stop")
    @classmethod
    def stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("temperature")
    @classmethod
    def greedy_or_above_the_floor(cls, value):
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature = {value!r} is below {MIN_TEMPERATURE:g}; give 0 for greedy decoding or a "
                             f"value in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]")
        return value


class CompletionRequest(SamplingRequest):
    prompt: PromptInput
    echo: StrictBool | None = None
    best_of: StrictInt | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id ...: passed to the template

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    @field_validator("content")
    @classmethod
    def text(cls, value):
        return valid_text(value, "content")


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)


class EmbeddingRequest(Strict):
    model: str | None = None
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None  # embeddings have the model's size
    user: str | None = None
    nsn: NSNOptions | None = None


class OverrideRequest(Strict):
    """``POST /v1/nsn/override``: cap the device's rank ceiling by hand (None releases it)."""

    rank: StrictInt | None = Field(None, ge=1)
