"""nanoseek's chat format: DeepSeek-R1's template with DeepSeek-V3.1's tool-call markup and thinking switch.

One format, written twice on purpose: `CHAT_TEMPLATE` is the Jinja template saved in tokenizer_config.json
(so transformers, vLLM and SGLang render our checkpoints exactly as we do, tools included), and
`render_chat` renders the same text as a list of segments that say which parts are the template's own
markup. Only markup may become control tokens: `encode_segments` encodes message text (user, system, tool
results, assistant replies, tool names and arguments) with special-token parsing off, so a user who types
`<｜Assistant｜>` or `<｜tool▁call▁begin｜>` gets plain text, not a role switch or a fake tool call. The
test suite renders many conversations both ways and checks the texts are identical.

    bos system[\\n\\n## Tools ...]                                      system messages joined by a blank line
    <｜User｜>question
    <｜Assistant｜>answer<｜end▁of▁sentence｜>                              earlier reasoning dropped
    <｜Assistant｜>[text]<｜tool▁calls▁begin｜>                              a turn that calls tools (V3.1 markup)
        <｜tool▁call▁begin｜>name<｜tool▁sep｜>{"arg": 1}<｜tool▁call▁end｜>   one per call, back to back
        <｜tool▁calls▁end｜><｜end▁of▁sentence｜>
    <｜tool▁output▁begin｜>result<｜tool▁output▁end｜>                       one per `tool` message
    answer<｜end▁of▁sentence｜>                                            after tool results: no role token
    <｜Assistant｜><think>\\n   (thinking on, the default)  |  <｜Assistant｜></think>   (thinking off)

Where it follows whom: roles, the reasoning drop and the open `<think>\\n` generation prompt are
DeepSeek-R1's template; the tool markup, the tool results and the `thinking` switch (`</think>` right
after `<｜Assistant｜>` turns thinking off; a last assistant message with `"prefix": true` is continued,
not closed) are DeepSeek-V3.1's. V3/R1 spell a call differently
(`function<｜tool▁sep｜>name\\n```json\\n{...}\\n```` and wrap results in `<｜tool▁outputs▁begin｜>`):
`render_tool_call(..., style="v3")` writes that form and nanoseek.infer.tools parses both. The tool list in
the system prompt is our own wording (V3's template has none; V3.1's model card asks the caller to write
one).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nanoseek.data.special_tokens import (ASSISTANT, BOS, END_THINK, EOS, SPECIAL_TOKENS, THINK, TOOL_CALL_BEGIN,
                                          TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_OUTPUT_BEGIN,
                                          TOOL_OUTPUT_END, TOOL_SEP, USER)
from nanoseek.errors import NanoseekError

TOOLS_HEADER = "## Tools\nYou can call the following functions.\n"
TOOLS_FOOTER = ("\nTo call functions, reply with " + TOOL_CALLS_BEGIN + ", then " + TOOL_CALL_BEGIN + "name"
                + TOOL_SEP + "arguments" + TOOL_CALL_END + " for each call (the arguments are one JSON object that"
                " follows the function's parameters; several calls follow each other directly), then "
                + TOOL_CALLS_END + ".")


def _q(s: str) -> str:
    """A Python string as a single-quoted Jinja literal."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# Whitespace control (`{%-`) everywhere keeps every newline explicit, so the template renders the same under
# transformers' settings (trim_blocks, lstrip_blocks) and ours.
CHAT_TEMPLATE = (
    "{%- set thinking = thinking if thinking is defined else (enable_thinking if enable_thinking is defined else true) -%}"
    "{%- set ns = namespace(system='', last='', prefix=false) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + message['content'] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{{- bos_token + ns.system -}}"
    "{%- if tools -%}"
    "{{- ('\\n\\n' if ns.system else '') + " + _q(TOOLS_HEADER) + " -}}"
    "{%- for tool in tools -%}{%- set fn = tool['function'] if tool['function'] is defined else tool -%}"
    "{{- '\\n### ' + fn['name'] + '\\n' -}}"
    "{%- if fn['description'] -%}{{- 'Description: ' + fn['description'] + '\\n' -}}{%- endif -%}"
    "{{- 'Parameters: ' + ((fn['parameters'] if fn['parameters'] is defined else {}) | tojson) + '\\n' -}}"
    "{%- endfor -%}"
    "{{- " + _q(TOOLS_FOOTER) + " -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- " + _q(USER) + " + message['content'] -}}{%- set ns.last = 'user' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "{%- if " + _q(END_THINK) + " in content -%}{%- set content = content.split(" + _q(END_THINK) + ")[-1].lstrip() -%}{%- endif -%}"
    "{%- if ns.last != 'tool' -%}{{- " + _q(ASSISTANT) + " -}}{%- endif -%}"
    "{%- if message['prefix'] and loop.last -%}"
    "{{- (" + _q(THINK + "\n") + " if thinking else " + _q(END_THINK) + ") + content -}}{%- set ns.prefix = true -%}"
    "{%- else -%}"
    "{{- content -}}"
    "{%- if message['tool_calls'] -%}{{- " + _q(TOOL_CALLS_BEGIN) + " -}}"
    "{%- for call in message['tool_calls'] -%}{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{%- set args = fn['arguments'] if fn['arguments'] is defined else {} -%}"
    "{{- " + _q(TOOL_CALL_BEGIN) + " + fn['name'] + " + _q(TOOL_SEP)
    + " + (args if args is string else args | tojson) + " + _q(TOOL_CALL_END) + " -}}"
    "{%- endfor -%}{{- " + _q(TOOL_CALLS_END) + " -}}{%- endif -%}"
    "{{- eos_token -}}"
    "{%- endif -%}"
    "{%- set ns.last = 'assistant' -%}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- " + _q(TOOL_OUTPUT_BEGIN) + " + message['content'] + " + _q(TOOL_OUTPUT_END) + " -}}{%- set ns.last = 'tool' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and ns.last != 'tool' and not ns.prefix -%}"
    "{{- " + _q(ASSISTANT) + " + (" + _q(THINK + "\n") + " if thinking else " + _q(END_THINK) + ") -}}"
    "{%- endif -%}"
)


class ChatFormatError(NanoseekError, ValueError):
    """Messages, tools or template options the chat format cannot render (HTTP 400); `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Segment:
    text: str
    markup: bool  # the template's own text (may hold special tokens) vs. content from the request


def tojson(value: object) -> str:
    """JSON as transformers' chat-template `tojson` filter writes it (and ours: see register_filters)."""
    return json.dumps(value, ensure_ascii=False)


def register_filters(env) -> None:
    """Make a Jinja environment render `tojson` like transformers (jinja's own escapes <, > and &)."""
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)


def _function(entry: Mapping, what: str, i: int) -> Mapping:
    fn = entry.get("function", entry) if isinstance(entry, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ChatFormatError(f"{what}[{i}] must have a function with a non-empty string 'name'", what)
    return fn


def render_tool_call(name: str, arguments: str | Mapping, style: str = "v3.1") -> list[Segment]:
    """One call's markup: V3.1 `<call>name<sep>{args}<end>` or V3 `<call>function<sep>name\\n```json\\n{args}\\n```<end>`."""
    args = arguments if isinstance(arguments, str) else tojson(arguments)
    if style == "v3.1":
        return [Segment(TOOL_CALL_BEGIN, True), Segment(name, False), Segment(TOOL_SEP, True), Segment(args, False),
                Segment(TOOL_CALL_END, True)]
    if style == "v3":
        return [Segment(TOOL_CALL_BEGIN + "function" + TOOL_SEP, True), Segment(name, False),
                Segment("\n```json\n", True), Segment(args, False), Segment("\n```" + TOOL_CALL_END, True)]
    raise ValueError(f"unknown tool-call style {style!r} (v3.1 or v3)")


def render_tools(tools: Sequence[Mapping], after_system: bool) -> list[Segment]:
    """The system-prompt section that lists the functions (names, descriptions and schemas are request text)."""
    segs = [Segment(("\n\n" if after_system else "") + TOOLS_HEADER, True)]
    for i, tool in enumerate(tools):
        fn = _function(tool, "tools", i)
        segs += [Segment("\n### ", True), Segment(fn["name"], False), Segment("\n", True)]
        if fn.get("description"):
            segs += [Segment("Description: ", True), Segment(str(fn["description"]), False), Segment("\n", True)]
        segs += [Segment("Parameters: ", True), Segment(tojson(fn.get("parameters", {})), False), Segment("\n", True)]
    segs.append(Segment(TOOLS_FOOTER, True))
    return segs


def _text(m: Mapping, i: int, allow_none: bool = False) -> str:
    c = m.get("content")
    if c is None and allow_none:
        return ""
    if not isinstance(c, str):
        raise ChatFormatError(f"messages[{i}].content must be a string, got {type(c).__name__}", f"messages[{i}].content")
    return c


def render_chat(messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None,
                add_generation_prompt: bool = False, thinking: bool = True) -> list[Segment]:
    """The segments of a chat in nanoseek's format; their texts joined equal CHAT_TEMPLATE's rendering."""
    system = ""
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ChatFormatError(f"messages[{i}] must be an object with a 'role'", f"messages[{i}]")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise ChatFormatError(f"messages[{i}] has unknown role {m['role']!r} (system, user, assistant or tool)",
                                  f"messages[{i}].role")
        if m["role"] == "system":
            system = system + ("\n\n" if system else "") + _text(m, i)
    segs = [Segment(BOS, True)]
    if system:
        segs.append(Segment(system, False))
    if tools:
        segs += render_tools(tools, after_system=bool(system))
    last, prefix = "", False
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "user":
            segs += [Segment(USER, True), Segment(_text(m, i), False)]
        elif role == "assistant":
            content = _text(m, i, allow_none=True)
            if END_THINK in content:
                content = content.split(END_THINK)[-1].lstrip()
            if last != "tool":
                segs.append(Segment(ASSISTANT, True))
            if m.get("prefix"):
                if i != len(messages) - 1:
                    raise ChatFormatError("only the last message may be an assistant prefix", f"messages[{i}].prefix")
                segs += [Segment(THINK + "\n" if thinking else END_THINK, True), Segment(content, False)]
                prefix = True
            else:
                segs.append(Segment(content, False))
                calls = m.get("tool_calls")
                if calls:
                    segs.append(Segment(TOOL_CALLS_BEGIN, True))
                    for j, call in enumerate(calls):
                        fn = _function(call, f"messages[{i}].tool_calls", j)
                        segs += render_tool_call(fn["name"], fn.get("arguments", {}))
                    segs.append(Segment(TOOL_CALLS_END, True))
                segs.append(Segment(EOS, True))
        elif role == "tool":
            segs += [Segment(TOOL_OUTPUT_BEGIN, True), Segment(_text(m, i), False), Segment(TOOL_OUTPUT_END, True)]
        if role != "system":
            last = role
    if add_generation_prompt and last != "tool" and not prefix:
        segs += [Segment(ASSISTANT, True), Segment(THINK + "\n" if thinking else END_THINK, True)]
    return [s for s in segs if s.text]


def chat_text(segments: Sequence[Segment]) -> str:
    return "".join(s.text for s in segments)


@functools.lru_cache(maxsize=8)
def _special_re(tokens: tuple[str, ...]) -> re.Pattern:
    if not tokens:
        return re.compile("(\\A\\b\\B)")  # matches nothing: no piece is ever split off
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")")


_SPECIAL_RE = _special_re(SPECIAL_TOKENS)


def encode_segments(tokenizer, segments: Sequence[Segment], special_tokens: Sequence[str] | None = None) -> list[int]:
    """Token ids of rendered segments: special tokens only from markup, everything else as plain text.

    `tokenizer` needs `encode` (special tokens parsed) and `encode_plain` (parsing off), as
    nanoseek.data.tokenizer.Tokenizer has. Plain text between two special tokens is encoded as one run,
    so for content without special-token strings the ids equal those of encoding the whole text.
    `special_tokens`: the strings markup may hold as control tokens (default DeepSeek's; another model's
    tokenizer passes its own).
    """
    split = _SPECIAL_RE.split if special_tokens is None else _special_re(tuple(special_tokens)).split
    ids: list[int] = []
    run: list[str] = []
    for seg in segments:
        if not seg.markup:
            run.append(seg.text)
            continue
        for k, piece in enumerate(split(seg.text)):
            if k % 2 == 0:
                run.append(piece)
            else:
                if run:
                    ids += tokenizer.encode_plain("".join(run))
                    run = []
                ids += tokenizer.encode(piece)
    if run and "".join(run):
        ids += tokenizer.encode_plain("".join(run))
    return ids


def thinking_option(thinking: object = None, chat_template_kwargs: object = None, default: bool = True) -> bool:
    """Thinking on or off from an API request: DeepSeek's `thinking: {"type": "enabled"|"disabled"}` and/or
    vLLM's `chat_template_kwargs: {"thinking": bool}` (or `enable_thinking`); they must agree."""
    choices = []
    if thinking is not None:
        kind = thinking.get("type") if isinstance(thinking, Mapping) else None
        if kind not in ("enabled", "disabled"):
            raise ChatFormatError('thinking must be {"type": "enabled"} or {"type": "disabled"}', "thinking")
        choices.append(("thinking", kind == "enabled"))
    if chat_template_kwargs is not None:
        if not isinstance(chat_template_kwargs, Mapping):
            raise ChatFormatError("chat_template_kwargs must be an object", "chat_template_kwargs")
        unknown = sorted(set(chat_template_kwargs) - {"thinking", "enable_thinking"})
        if unknown:
            raise ChatFormatError(f"unsupported chat_template_kwargs {unknown} (supported: thinking, enable_thinking)",
                                  "chat_template_kwargs")
        for key in ("thinking", "enable_thinking"):
            if key in chat_template_kwargs:
                if not isinstance(chat_template_kwargs[key], bool):
                    raise ChatFormatError(f"chat_template_kwargs.{key} must be a boolean", f"chat_template_kwargs.{key}")
                choices.append((f"chat_template_kwargs.{key}", chat_template_kwargs[key]))
    if len({v for _, v in choices}) > 1:
        raise ChatFormatError(f"conflicting thinking settings: {', '.join(f'{k}={v}' for k, v in choices)}", "thinking")
    return choices[0][1] if choices else default
