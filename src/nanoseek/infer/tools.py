"""Function calling in DeepSeek's format: validate `tools` / `tool_choice`, parse generated tool-call markup
into OpenAI `tool_calls` (whole or as streamed deltas), and build the grammar that forces a call.

The markup (nanoseek.data.chat_template renders it into prompts):

    V3.1 (ours):  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{ARGS}<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
    V3 / R1:      <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{ARGS}\\n```<｜tool▁call▁end｜>
                  (calls separated by a newline) ...<｜tool▁calls▁end｜>

`ToolCallParser` reads either form from text decoded with special tokens kept, incrementally: text before
the calls is content; each call's first delta carries index, id, type and name (sent once the name is
complete), the arguments follow in pieces, exactly as OpenAI streams them. Markup that goes wrong (an
unknown or malformed name, text where a call should start, a call cut off) falls back to plain content:
the non-streamed `parse_tool_calls` returns the raw text as content, never a half call. The arguments are
the model's text verbatim, so the streamed pieces joined equal the non-streamed `function.arguments`.

`tool_call_grammar` turns `tool_choice="required"` or a named function into a grammar (nanoseek.infer.grammar)
whose calls name an offered function and whose arguments match its JSON schema.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from nanoseek.data.special_tokens import (TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END,
                                          TOOL_SEP)
from nanoseek.infer.grammar import Grammar, GrammarError, GrammarTokenizer, json_schema_options, strict_schema

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
MAX_NAME = 64
_V3_OPEN = "\n```json\n"
_V3_CLOSE = "\n```"


class ToolError(GrammarError):
    """Invalid `tools` / `tool_choice` (HTTP 400); `param` names the field."""


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: Mapping
    strict: bool = False


def validate_tools(tools: object) -> list[Function]:
    """The functions of an API `tools` list (OpenAI shape: {"type": "function", "function": {...}})."""
    if tools is None:
        return []
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ToolError("tools must be a list of function tools", "tools")
    out, seen = [], set()
    for i, t in enumerate(tools):
        if not isinstance(t, Mapping) or t.get("type", "function") != "function" or not isinstance(t.get("function"), Mapping):
            raise ToolError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}',
                            f"tools[{i}]")
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME or not set(name) <= _NAME_CHARS:
            raise ToolError(f"tools[{i}].function.name must be 1-{MAX_NAME} characters of a-z, A-Z, 0-9, _, . and -",
                            f"tools[{i}].function.name")
        if name in seen:
            raise ToolError(f"tools[{i}]: function {name!r} is defined twice", f"tools[{i}].function.name")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON Schema object", f"tools[{i}].function.parameters")
        desc = fn.get("description", "")
        if not isinstance(desc, str):
            raise ToolError(f"tools[{i}].function.description must be a string", f"tools[{i}].function.description")
        strict = fn.get("strict", False)
        if not isinstance(strict, bool):
            raise ToolError(f"tools[{i}].function.strict must be a boolean", f"tools[{i}].function.strict")
        out.append(Function(name, desc, dict(params), strict))
    return out


def resolve_tool_choice(tool_choice: object, functions: Sequence[Function]) -> tuple[str, list[Function]]:
    """("none" | "auto" | "required", the functions a call may use) for an API `tool_choice`.

    A named function (`{"type": "function", "function": {"name": ...}}`) comes back as ("required", [it]).
    The default is "auto" when tools are given and "none" otherwise, as in the OpenAI and DeepSeek APIs.
    """
    if tool_choice is None:
        return ("auto" if functions else "none"), list(functions)
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not functions:
            raise ToolError('tool_choice "required" needs at least one tool', "tool_choice")
        return tool_choice, list(functions) if tool_choice != "none" else []
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), Mapping):
        name = tool_choice["function"].get("name")
        for f in functions:
            if f.name == name:
                return "required", [f]
        raise ToolError(f"tool_choice names function {name!r}, which is not among the tools", "tool_choice")
    raise ToolError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
                    "tool_choice")


def tool_call_grammar(functions: Sequence[Function], tokenizer: GrammarTokenizer, parallel: bool = True,
                      style: str = "v3.1") -> Grammar:
    """A grammar for one call (or several, when `parallel`) of the given functions, arguments per schema."""
    if not functions:
        raise ToolError("a forced tool call needs at least one function", "tools")
    ids = {}
    for tok in (TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP):
        i = tokenizer.token_id(tok)
        if i is None:
            raise ToolError(f"this model's tokenizer has no {tok} token, so it cannot make tool calls", "tools")
        ids[tok] = f"<[{i}]>"
    rules, alts = [], []
    for k, f in enumerate(functions):
        schema = strict_schema(dict(f.parameters)) if f.strict else dict(f.parameters)
        args = json.dumps({**schema, **json_schema_options()})
        if style == "v3.1":
            call = f'{ids[TOOL_CALL_BEGIN]} {json.dumps(f.name)} {ids[TOOL_SEP]} args{k} {ids[TOOL_CALL_END]}'
        elif style == "v3":
            call = (f'{ids[TOOL_CALL_BEGIN]} "function" {ids[TOOL_SEP]} {json.dumps(f.name + _V3_OPEN)} args{k} '
                    f'{json.dumps(_V3_CLOSE)} {ids[TOOL_CALL_END]}')
        else:
            raise ValueError(f"unknown tool-call style {style!r} (v3.1 or v3)")
        rules += [f"call{k}: {call}", f"args{k}: %json {args}"]
        alts.append(f"call{k}")
    # V3 puts a newline between calls, V3.1 nothing.
    more = ('("\\n" call)*' if style == "v3" else "call*") if parallel else ""
    lark = "\n".join([f"start: {ids[TOOL_CALLS_BEGIN]} call {more} {ids[TOOL_CALLS_END]}",
                      "call: " + " | ".join(alts), *rules]) + "\n"
    grammar = Grammar.from_lark(lark, kind="tool_call")
    return tokenizer.compile(grammar)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolDelta:
    """What one piece of generated text adds: content text and/or OpenAI streaming `tool_calls` entries."""

    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


def _held(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of the markers."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if m.startswith(text[-n:]):
                best = n
                break
    return best


@dataclass
class _Call:
    index: int
    id: str
    raw: str = ""  # the markup as generated, for the fallback to content
    name: str = ""
    arguments: str = ""
    complete: bool = False


class ToolCallParser:
    """Incremental parser of generated answer text into content and tool calls (both DeepSeek forms).

    `feed(text)` returns a ToolDelta for each new piece; `finish()` flushes what was held back, and
    `result()` gives the non-streamed view. With `tool_names`, a call to any other name is not a call:
    its markup becomes content. A call is announced (first delta) only once its name is complete, so
    markup that breaks before that is returned as content even when streaming.
    """

    def __init__(self, tool_names: Sequence[str] | None = None):
        self.tool_names = frozenset(tool_names) if tool_names is not None else None
        self.calls: list[_Call] = []
        self.content = ""
        self._buf = ""  # text received, not yet assigned
        self._pending = ""  # markup consumed for a call that is not announced yet
        self._state = "content"  # content -> calls -> head -> args -> calls ... ; "plain" after garbled markup
        self._style = ""

    def feed(self, text: str) -> ToolDelta:
        d = ToolDelta()
        self._buf += text
        while self._buf and getattr(self, "_step_" + self._state)(d):
            pass
        return d

    def finish(self) -> ToolDelta:
        """End of generation: release held-back text; a call cut off before its name becomes content."""
        d = ToolDelta()
        if self._state == "args":
            if self._buf:
                self._add_args(d, self._buf)
        elif self._state == "head" or self._pending or (self._state == "calls" and self._buf.strip()):
            self._fallback(d)
        elif self._state != "calls":
            self._emit(d, self._buf)
        self._buf = ""
        return d

    def result(self) -> tuple[str, list[dict]]:
        """(content, complete tool calls); the markup of a call cut off mid-arguments is returned as content."""
        content, calls = self.content, []
        for c in self.calls:
            if c.complete:
                calls.append({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}})
            else:
                content += c.raw
        return content, calls

    # -- pieces -----------------------------------------------------------------------------------------
    def _emit(self, d: ToolDelta, text: str) -> None:
        d.content += text
        self.content += text

    def _fallback(self, d: ToolDelta) -> None:
        """Garbled markup: what was not announced as a call is content, and so is all later text."""
        if self.calls and not self.calls[-1].name:
            self.calls.pop()
        self._emit(d, self._pending + self._buf)
        self._pending, self._buf, self._state = "", "", "plain"

    def _valid_name(self, name: str) -> bool:
        ok = 1 <= len(name) <= MAX_NAME and set(name) <= _NAME_CHARS
        return ok and (self.tool_names is None or name in self.tool_names)

    def _add_args(self, d: ToolDelta, piece: str) -> None:
        call = self.calls[-1]
        call.arguments += piece
        call.raw += piece
        d.tool_calls.append({"index": call.index, "function": {"arguments": piece}})

    # -- the states (each returns True when it made progress and the loop should go on) ------------------
    def _step_plain(self, d: ToolDelta) -> bool:
        self._emit(d, self._buf)
        self._buf = ""
        return False

    def _step_content(self, d: ToolDelta) -> bool:
        hits = [(i, m) for m in (TOOL_CALLS_BEGIN, TOOL_CALL_BEGIN) if (i := self._buf.find(m)) >= 0]
        if not hits:
            keep = _held(self._buf, (TOOL_CALLS_BEGIN, TOOL_CALL_BEGIN))
            self._emit(d, self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        i, marker = min(hits)
        self._emit(d, self._buf[:i])
        self._buf = self._buf[i:]
        if marker == TOOL_CALLS_BEGIN:
            self._pending, self._buf = TOOL_CALLS_BEGIN, self._buf[len(TOOL_CALLS_BEGIN):]
        self._state = "calls"
        return True

    def _step_calls(self, d: ToolDelta) -> bool:
        stripped = self._buf.lstrip()
        if not stripped:
            return False
        if stripped.startswith(TOOL_CALL_BEGIN):
            self._pending += self._buf[:len(self._buf) - len(stripped)] + TOOL_CALL_BEGIN
            self._buf = stripped[len(TOOL_CALL_BEGIN):]
            self.calls.append(_Call(index=len(self.calls), id=new_call_id()))
            self._state = "head"
            return True
        if stripped.startswith(TOOL_CALLS_END) and self.calls and not self._pending:
            self._buf, self._state = stripped[len(TOOL_CALLS_END):], "content"
            return True
        if TOOL_CALL_BEGIN.startswith(stripped) or TOOL_CALLS_END.startswith(stripped):
            return False  # a marker still being generated
        self._fallback(d)
        return True

    def _step_head(self, d: ToolDelta) -> bool:
        i = self._buf.find(TOOL_SEP)
        if i < 0:
            if len(self._buf) > MAX_NAME or any(m in self._buf for m in (TOOL_CALL_END, TOOL_CALL_BEGIN, TOOL_CALLS_END)):
                self._fallback(d)
                return True
            return False
        head, rest = self._buf[:i], self._buf[i + len(TOOL_SEP):]
        if head == "function" and not (self.tool_names and "function" in self.tool_names):
            j = rest.find(_V3_OPEN)  # V3: the name follows the separator, up to the opening fence
            if j < 0:
                if len(rest) > MAX_NAME + len(_V3_OPEN) or TOOL_CALL_END in rest:
                    self._fallback(d)
                    return True
                return False
            name, consumed, style = rest[:j], head + TOOL_SEP + rest[:j + len(_V3_OPEN)], "v3"
        else:
            name, consumed, style = head, head + TOOL_SEP, "v3.1"
        if not self._valid_name(name):
            self._fallback(d)
            return True
        call = self.calls[-1]
        call.name, call.raw, self._style = name, self._pending + consumed, style
        self._pending, self._buf = "", self._buf[len(consumed):]
        d.tool_calls.append({"index": call.index, "id": call.id, "type": "function",
                             "function": {"name": name, "arguments": ""}})
        self._state = "args"
        return True

    def _step_args(self, d: ToolDelta) -> bool:
        end = _V3_CLOSE + TOOL_CALL_END if self._style == "v3" else TOOL_CALL_END
        i = self._buf.find(end)
        if i < 0 and self._style == "v3" and (j := self._buf.find(TOOL_CALL_END)) >= 0:
            i, end = j, TOOL_CALL_END  # a V3 call that forgot its closing fence
        if i < 0:
            keep = _held(self._buf, (end, TOOL_CALL_END))
            if len(self._buf) > keep:
                self._add_args(d, self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        if i:
            self._add_args(d, self._buf[:i])
        self._buf = self._buf[i + len(end):]
        call = self.calls[-1]
        call.raw += end
        call.complete = True
        self._state = "calls"
        return True


def parse_tool_calls(text: str, tool_names: Sequence[str] | None = None) -> tuple[str, list[dict]]:
    """(content, OpenAI `tool_calls`) of a whole generated answer; garbled markup stays content."""
    p = ToolCallParser(tool_names)
    p.feed(text)
    p.finish()
    return p.result()
