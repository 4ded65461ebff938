"""Pydantic models of the OpenAI-compatible API (https://platform.openai.com/docs/api-reference/chat): the
requests, and the model list.

Requests are validated strictly on types and ranges (each failure becomes a 400 naming the field) but
ignore unknown fields, as OpenAI-compatible servers commonly do, so clients that send extra options work.
Completion responses and stream chunks are built as plain dicts in app.py (their exact shape, `null`s
included, is what OpenAI clients parse; tests check it with the real `openai` client).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 8
MAX_STOP = 4


class _Request(BaseModel):
    # strict: "yes" is not a bool and "0.5" not a number (requests are validated in JSON mode, where
    # integers still count as floats)
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    reasoning_content: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _Sampling(_Request):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # an extension (vLLM has it too); 0 = off
    ignore_eos: bool = False  # an extension (vLLM's): generate exactly max_tokens, for load tests
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted for compatibility; only 0 (their default) is supported.
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Union[str, list[str], None]) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @model_validator(mode="after")
    def _penalties(self) -> "_Sampling":
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported (use 0)")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for /v1/completions
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Union[str, list[int]]) -> Union[str, list[int]]:
        if isinstance(v, list) and not v:
            raise ValueError("the prompt token list is empty")
        return v

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class TokenizeRequest(_Request):
    """POST /tokenize, in vLLM's shape: the token count of a chat (rendered with the template, as a chat
    completion would be) or of a prompt, beside the context length. The web chat sizes max_tokens by it."""
    model: str | None = None
    messages: list[ChatMessage] | None = None
    prompt: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "TokenizeRequest":
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        return self


# ----------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanoseek"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
