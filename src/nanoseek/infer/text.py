"""Text around the token-id engine: tokenizer loading, chat templates, streaming detokenization and the
reasoning / answer split of R1-style outputs (`<think> ... </think> answer`, DeepSeek-R1 section 2.2).

* Chat formatting renders the model directory's `chat_template` (tokenizer_config.json) with Jinja2 in a
  sandbox, as transformers does, so real DeepSeek checkpoints get their own format; without one we use
  the DeepSeek-V3 layout `<bos>{system}<｜User｜>{user}<｜Assistant｜>{answer}<eos>...`.
* Templates may already open `<think>` at the generation prompt (R1-0528 does); the stream then starts
  inside the reasoning.
* Stop strings apply to the answer only, never to the chain of thought (a stop word the model merely
  thinks about must not end its answer).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import jinja2.sandbox

from nanoseek.data.chat_template import register_filters
from nanoseek.data.tokenizer import CHAT_TEMPLATE, END_THINK, THINK, load_tokenizer
from nanoseek.errors import NanoseekError

class TextError(NanoseekError, ValueError):
    """A chat the template cannot render, or a tokenizer directory we cannot read."""


def _raise(message: str) -> None:
    raise TextError(message)


class ChatTokenizer:
    """Tokenizer + chat template of a model directory (tokenizer.json, tokenizer_config.json).

    Without a `chat_template` in the directory we use the R1 template of nanoseek.data.chat, the
    one our SFT and RL stages train with (it opens `<think>` at the generation prompt).
    """

    def __init__(self, model_dir: str | Path):
        d = Path(model_dir)
        self.tok = load_tokenizer(d)  # a missing or corrupt tokenizer is a DataError naming the file
        cfg_path = d / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
        self.bos_token = _token_text(cfg.get("bos_token")) or self.tok.hf.id_to_token(self.tok.bos_id)
        self.eos_token = _token_text(cfg.get("eos_token")) or self.tok.hf.id_to_token(self.tok.eos_id)
        template = self.tok.chat_template
        if isinstance(template, list):  # the named-template form: [{"name": "default", "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.has_own_template = bool(cfg.get("chat_template"))
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        register_filters(env)  # `tojson` as transformers writes it (templates render tool schemas with it)
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self.template = env.from_string(template or CHAT_TEMPLATE)
        self.bos_id, self.eos_id = self.tok.bos_id, self.tok.eos_id
        # Ids never shown as text: bos/eos/pad. <think> and </think> stay visible: the splitter needs them.
        self.hidden_ids = {self.tok.bos_id, self.tok.eos_id, self.tok.pad_id}

    @property
    def vocab_size(self) -> int:
        return self.tok.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special-token strings in it (from a rendered template) map to their ids."""
        return self.tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i not in self.hidden_ids and i < self.vocab_size])

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TextError:
            raise
        except jinja2.TemplateError as e:
            raise TextError(f"the chat template failed to render these messages: {e}") from None

    def chat_prompt(self, messages: list[dict]) -> tuple[list[int], bool]:
        """Prompt ids for a chat, and whether the template already opened the <think> block."""
        text = self.render(messages)
        return self.encode(text), text.rstrip().endswith(THINK)

    def stream(self, think_opened: bool = False, stop: list[str] | None = None,
               split_reasoning: bool = True) -> "TextStream":
        return TextStream(self, think_opened=think_opened, stop=list(stop or []), split=split_reasoning)


def _token_text(v: object) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker (it may still complete)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    stopped: bool = False  # a stop string ended the answer; the caller should cancel generation


@dataclass
class TextStream:
    """Incremental token ids -> (reasoning, content) text deltas.

    Detokenization is byte-exact (the tokenizer's StreamDecoder holds a multi-byte character back until
    its last byte arrives).
    """

    tokenizer: ChatTokenizer
    think_opened: bool = False
    stop: list[str] = field(default_factory=list)
    split: bool = True
    ids: list[int] = field(default_factory=list)
    reasoning_tokens: int = 0
    reasoning: str = ""
    content: str = ""
    _raw: str = ""  # decoded text not yet assigned to reasoning or content
    _mode: str = "start"  # start -> (reasoning ->) answer
    _stopped: bool = False

    def __post_init__(self) -> None:
        self._decoder = self.tokenizer.tok.stream_decoder()
        if self.think_opened and self.split:
            self._mode = "reasoning"
        elif not self.split:
            self._mode = "answer"

    def feed(self, new_ids: list[int], final: bool = False) -> Delta:
        delta = Delta()
        if self._stopped:
            delta.stopped = True
            return delta
        for t in new_ids:
            self.ids.append(t)
            if self._mode != "answer":
                self.reasoning_tokens += 1  # reset to 0 if the output turns out to have no think block
            # Checkpoints often pad vocab_size past the tokenizer (DeepSeek-V3: 129280 rows); such ids have no text.
            if t not in self.tokenizer.hidden_ids and t < self.tokenizer.vocab_size:
                self._raw += self._decoder.push(t)
            self._route(delta, final=False)
            if delta.stopped:
                break
        if final and not delta.stopped:
            self._raw += self._decoder.flush()
            self._route(delta, final=True)
        self.reasoning += delta.reasoning
        self.content += delta.content
        return delta

    def _route(self, delta: Delta, final: bool) -> None:
        if self._mode == "start":
            stripped = self._raw.lstrip()
            if stripped.startswith(THINK):
                self._mode, self._raw = "reasoning", stripped[len(THINK):]
            elif THINK.startswith(stripped) and not final:
                return  # could still become "<think>"
            else:
                self._mode, self.reasoning_tokens = "answer", 0
        if self._mode == "reasoning":
            if not self.reasoning and not delta.reasoning:
                self._raw = self._raw.lstrip()  # the newline after a <think> the model wrote itself
            i = self._raw.find(END_THINK)
            if i >= 0:
                delta.reasoning += self._raw[:i].rstrip()
                self._raw = self._raw[i + len(END_THINK):].lstrip()
                self._mode = "answer"
            else:
                # Hold back a possible start of </think>, and trailing whitespace (dropped if </think> follows).
                keep = 0 if final else _held_back(self._raw, END_THINK)
                body = self._raw[:len(self._raw) - keep]
                keep += 0 if final else len(body) - len(body.rstrip())
                delta.reasoning += self._raw[:len(self._raw) - keep]
                self._raw = self._raw[len(self._raw) - keep:]
                return
        if self._mode == "answer":
            if not self.content and not delta.content and self.reasoning_tokens:
                self._raw = self._raw.lstrip()  # the blank line after </think> is not part of the answer
            text = self.content + delta.content + self._raw
            base = len(self.content) + len(delta.content)
            hits = [i for i in (text.find(s, max(0, base - len(s))) for s in self.stop if s) if i >= 0]
            if hits:
                delta.content += text[base:min(hits)]
                self._raw, self._stopped, delta.stopped = "", True, True
                return
            keep = 0 if final else max([_held_back(text, s) for s in self.stop if s] + [0])
            keep = min(keep, len(self._raw))
            delta.content += self._raw[:len(self._raw) - keep]
            self._raw = self._raw[len(self._raw) - keep:]
