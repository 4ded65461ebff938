"""Text around the token-id engine: tokenizer loading, chat templates, streaming detokenization and the
reasoning / answer split of R1-style outputs (`<think> ... </think> answer`, DeepSeek-R1 section 2.2).

* Chat formatting renders the model directory's `chat_template` (tokenizer_config.json) with Jinja2 in a
  sandbox, as transformers does, so real checkpoints get their own format; without one (or with ours) we
  use nanoseek.data.chat_template (DeepSeek-R1's layout with V3.1's tools and thinking switch). Request
  text is encoded with special-token parsing off: only the template's markup becomes control tokens.
* Templates may already open `<think>` at the generation prompt (R1-0528 does); the stream then starts
  inside the reasoning.
* Stop strings apply to the answer only, never to the chain of thought (a stop word the model merely
  thinks about must not end its answer).
"""

from __future__ import annotations

import datetime
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import jinja2.sandbox

from nanoseek.data.chat_template import (ChatFormatError, Segment, encode_segments, register_filters, render_chat,
                                         thinking_option)
from nanoseek.data.tokenizer import (CHAT_TEMPLATE, END_THINK, THINK, TOOL_CALL_BEGIN, TOOL_CALLS_BEGIN,
                                     load_tokenizer)
from nanoseek.errors import NanoseekError

class TextError(NanoseekError, ValueError):
    """A chat the template cannot render, or a tokenizer directory we cannot read; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _raise(message: str) -> None:
    raise TextError(message)


class ChatTokenizer:
    """Tokenizer + chat template of a model directory (tokenizer.json, tokenizer_config.json,
    generation_config.json), whatever model it comes from.

    BOS/EOS/PAD come from tokenizer_config.json (else generation_config.json's ids, else DeepSeek's
    spellings); every id of generation_config.json's `eos_token_id` (an int or a list) ends generation.
    The chat template is the directory's own, rendered with Jinja2 in a sandbox as transformers does;
    ours (nanoseek.data.chat_template) only when there is none. Either way only the template's markup may
    become control tokens: request text is encoded with special-token parsing off (`chat_prompt`).
    """

    def __init__(self, model_dir: str | Path):
        d = Path(model_dir)
        self.tok = load_tokenizer(d)  # a missing or corrupt tokenizer is a DataError naming the file
        template = self.tok.chat_template
        if isinstance(template, list):  # the named-template form: [{"name": "default", "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.own_format = not template or template == CHAT_TEMPLATE  # nanoseek's: rendered as segments
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        register_filters(env)  # `tojson` as transformers writes it (templates render tool schemas with it)
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self.template = env.from_string(template or CHAT_TEMPLATE)
        self.bos_id, self.eos_id = self.tok.bos_id, self.tok.eos_id
        self.bos_token = self.tok.bos_token or ""
        self.eos_token = self.tok.eos_token
        gen = _generation_config(d)
        extra = gen.get("eos_token_id")
        extra = extra if isinstance(extra, list) else [extra] if extra is not None else []
        self.eos_ids = [self.eos_id] + [int(i) for i in extra if isinstance(i, int) and i != self.eos_id]
        # Ids never shown as text: bos/eos/pad. <think> and </think> stay visible: the splitter needs them.
        self.hidden_ids = {i for i in (self.tok.bos_id, self.tok.pad_id, *self.eos_ids) if i is not None}
        self.special_tokens = sorted({t.content for t in self.tok.hf.get_added_tokens_decoder().values() if t.special},
                                     key=len, reverse=True)
        self.end_think_id = self.tok.end_think_id
        self.tool_ids = self.tok.tool_ids
        # The most UTF-8 bytes one token stands for: len(text bytes) / this bounds the token count from below.
        self.max_token_bytes = max(1, max((len(t.encode("utf-8")) for t in self.tok.hf.get_vocab()), default=1))
        self._grammar_tokenizer = None
        self._lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return self.tok.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special-token strings in it (from a rendered template) map to their ids."""
        return self.tok.encode(text)

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of request text: special-token strings in it stay plain text."""
        return self.tok.encode_plain(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i not in self.hidden_ids and i < self.vocab_size])

    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        """(text, UTF-8 bytes) of one token for logprobs; a partial character shows as U+FFFD in the text."""
        b = self.tok.token_bytes(token_id) if 0 <= token_id < self.vocab_size else b""
        return b.decode("utf-8", errors="replace"), list(b)

    def min_tokens(self, text: str) -> int:
        """A lower bound on the token count of text, without tokenizing it (for early length checks)."""
        return len(text.encode("utf-8", errors="replace")) // self.max_token_bytes

    def grammar_tokenizer(self, vocab_size: int):
        """The structured-output view of this tokenizer (nanoseek.infer.grammar), built on first use."""
        from nanoseek.infer.grammar import GrammarTokenizer

        with self._lock:
            if self._grammar_tokenizer is None:
                self._grammar_tokenizer = GrammarTokenizer(self.tok.hf, self.eos_ids, vocab_size=vocab_size)
            return self._grammar_tokenizer

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None,
               thinking: bool = True) -> str:
        """The prompt text (the directory's template, or ours)."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token, tools=tools or None,
                                        thinking=thinking, enable_thinking=thinking)
        except TextError:
            raise
        except jinja2.TemplateError as e:
            raise TextError(f"the chat template failed to render these messages: {e}") from None
        except (TypeError, KeyError, AttributeError, ValueError) as e:
            raise TextError(f"the chat template cannot render these messages ({type(e).__name__}: {e})") from None

    def chat_prompt(self, messages: list[dict], tools: list | None = None, thinking: bool = True
                    ) -> tuple[list[int], bool]:
        """Prompt ids for a chat, and whether the prompt leaves a <think> block open (the output starts in
        the reasoning). Request text (contents, tool names and arguments) never becomes control tokens."""
        if self.own_format:
            try:
                segments = render_chat(messages, tools, add_generation_prompt=True, thinking=thinking)
            except ChatFormatError as e:
                raise TextError(str(e), e.param) from None
        else:
            segments = self._foreign_segments(messages, tools, thinking)
        text = "".join(s.text for s in segments)
        ids = encode_segments(self.tok, segments, self.special_tokens)
        return ids, text.rfind(THINK) > text.rfind(END_THINK)

    def _foreign_segments(self, messages: list[dict], tools: list | None, thinking: bool) -> list[Segment]:
        """Render the directory's template with every request string wrapped in sentinels (noncharacters
        plus a random nonce, so no request can forge one), then cut the text into markup and request text.
        A template that cuts a string (e.g. drops earlier reasoning) loses its sentinels: what is left of
        such a string counts as markup, so render the same messages plainly if any were lost."""
        nonce = secrets.token_hex(4)
        texts: list[str] = []

        def wrap(v: object) -> object:
            if isinstance(v, str):
                texts.append(v)
                return f"\ufdd0{nonce}{len(texts) - 1}\ufdd1{v}\ufdd2{nonce}{len(texts) - 1}\ufdd3"
            return v

        wrapped = []
        for m in messages:
            m2 = dict(m)
            m2["content"] = wrap(m.get("content"))
            wrapped.append(m2)
        text = self.render(wrapped, tools=tools, thinking=thinking)
        pattern = re.compile("\ufdd0" + nonce + "(\\d+)\ufdd1(.*?)\ufdd2" + nonce + "\\1\ufdd3", re.S)
        segments, pos = [], 0
        for match in pattern.finditer(text):
            segments.append(Segment(text[pos:match.start()], True))
            segments.append(Segment(match.group(2), False))
            pos = match.end()
        segments.append(Segment(text[pos:], True))
        if any(re.search("[\ufdd0-\ufdd3]", s.text) for s in segments):
            # A template that transformed a wrapped string: render plainly, specials parsed in markup only
            # where no request string is left to tell apart (the whole text counts as markup).
            return [Segment(self.render(messages, tools=tools, thinking=thinking), True)]
        return [s for s in segments if s.text]

    def thinking(self, thinking: object = None, chat_template_kwargs: object = None) -> bool:
        """Thinking on or off from a request (nanoseek.data.chat_template.thinking_option); TextError if malformed."""
        try:
            return thinking_option(thinking, chat_template_kwargs)
        except ChatFormatError as e:
            raise TextError(str(e), e.param) from None

    @property
    def call_opening_ids(self) -> list[int]:
        """The tokens that open a tool call (banned when tool_choice is "none"); empty without tool tokens."""
        return [self.tool_ids[t] for t in (TOOL_CALLS_BEGIN, TOOL_CALL_BEGIN) if t in self.tool_ids]

    def stream(self, think_opened: bool = False, stop: list[str] | None = None,
               split_reasoning: bool = True) -> "TextStream":
        return TextStream(self, think_opened=think_opened, stop=list(stop or []), split=split_reasoning)


def _generation_config(d: Path) -> dict:
    try:
        data = json.loads((d / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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
