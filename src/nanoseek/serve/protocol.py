"""Pydantic models of the OpenAI-compatible API (https://platform.openai.com/docs/api-reference/chat), with
DeepSeek's extensions (`thinking`, `prefix` on the last assistant message, FIM through `suffix`): the
requests, and the model list. docs/serving.md documents every field.

Requests are validated strictly on types and ranges (each failure becomes a 400 naming the field), and a
field we do not support is a 400 that names it (`extra="forbid"`), never silently ignored. Completion
responses and stream chunks are built as plain dicts (serve/chat.py, serve/completions.py: their exact
shape, `null`s included, is what OpenAI clients parse; tests check it with the real `openai` client).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 8
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20  # chat; /v1/completions allows 0-5 as OpenAI does
MAX_COMPLETION_LOGPROBS = 5

# Content part types other than text, and what to tell the client.
_UNSUPPORTED_PARTS = {"image_url": "images are not supported", "image": "images are not supported",
                      "input_image": "images are not supported", "input_audio": "audio is not supported",
                      "audio": "audio is not supported", "file": "files are not supported",
                      "video_url": "video is not supported"}


class _Request(BaseModel):
    # strict: "yes" is not a bool and "0.5" not a number (requests are validated in JSON mode, where
    # integers still count as floats); forbid: an unknown field is a 400 naming it.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str = Field(min_length=1)
    arguments: str = ""


class ToolCall(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None  # passed to the chat template (ours does not render it)
    reasoning_content: str | None = None  # accepted from clients that echo it back; earlier reasoning is dropped
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool results (DeepSeek's markup does not carry ids: results go in order)
    prefix: bool = False  # DeepSeek's chat prefix completion: continue this (last, assistant) message

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            for p in v:
                kind = p.get("type") if isinstance(p, dict) else None
                if kind in _UNSUPPORTED_PARTS:
                    raise ValueError(f"{_UNSUPPORTED_PARTS[kind]} (content part type {kind!r}); this model reads "
                                     "text only")
                if kind != "text":
                    raise ValueError(f"unknown content part type {kind!r} (only 'text' is supported)")
        return v

    @model_validator(mode="after")
    def _roles(self) -> "ChatMessage":
        if self.prefix and self.role != "assistant":
            raise ValueError("only an assistant message may have prefix: true")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages may have tool_calls")
        if self.role in ("system", "developer", "user", "tool") and self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        return self

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
    user: str | None = None  # an end-user id for abuse tracking; it changes no output (OpenAI's definition)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Union[str, list[str], None]) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k, b in (v or {}).items():
            if not k.isdigit():
                raise ValueError(f"logit_bias keys must be token ids (as strings), got {k!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {b} for token {k}")
        return v

    @model_validator(mode="after")
    def _stream_options(self) -> "_Sampling":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def bias(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}


class ThinkingOption(_Request):
    type: Literal["enabled", "disabled"]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None  # checked by nanoseek.infer.grammar.response_format_grammar
    tools: list[dict[str, Any]] | None = None  # checked by nanoseek.infer.tools.validate_tools
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool = True
    thinking: ThinkingOption | None = None  # DeepSeek's switch
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's spelling: {"thinking": false}

    @model_validator(mode="after")
    def _logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        for i, m in enumerate(self.messages):
            if m.prefix and i != len(self.messages) - 1:
                raise ValueError(f"messages[{i}]: only the last message may have prefix: true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    suffix: str | None = None  # fill in the middle (FIM): serve/completions.py says how it is rendered
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for /v1/completions
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("the prompt list is empty")
        if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("a prompt token list is empty")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> "CompletionRequest":
        if self.suffix is not None and self.echo:
            raise ValueError("echo is not supported together with suffix")
        if self.echo and self.logprobs is not None:
            raise ValueError("logprobs of echoed prompt tokens are not supported (use echo or logprobs)")
        return self

    @property
    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts as a list: a string or one token list is a single prompt."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

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
