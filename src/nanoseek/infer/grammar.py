"""Structured output: compile `response_format` and tool-call constraints into per-request token matchers.

The OpenAI / DeepSeek API asks for JSON (`response_format={"type": "json_object"}`), for JSON matching a
schema (`{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`), or, with `tool_choice`
"required" or a named function, for a tool call whose arguments match the function's parameter schema
(nanoseek.infer.tools builds that grammar). Each such request gets a `Matcher`: before every decode step
the sampler asks all matchers of the batch for a bitmask of the tokens that keep the output inside the
grammar (`fill_masks`, one call per step, computed in parallel), sets every other logit of those rows to
-inf (`apply_masks`; rows without a matcher are untouched), samples, and feeds each row's token back
(`advance`). A matcher in an accepting state allows EOS; EOS is masked out until the JSON is complete.

"Apply to the answer only": a reasoning model writes free text inside `<think>...</think>` first. A
matcher built with `trigger_ids` (the `</think>` id) stays inactive, leaving the row free except that EOS
is masked (the answer must still come), and starts constraining after the trigger token.

Speculative decoding rejects drafted tokens: `rollback(n)` undoes the last n advances, across the trigger
too.

The library is llguidance (Microsoft's guidance engine: an Earley parser over a lexer whose masks come
from a token trie), chosen by benchmarks/bench_grammar.py, which measures it beside outlines-core and
xgrammar on our tokenizer and a 128K-token one (benchmarks/results/grammar.json; the table and the
reasoning are in docs/structured-output.md). In short: outlines-core compiles a regex index over the
vocabulary per schema, far too slow for a request to wait on; xgrammar computes cheaper masks but needs
triton and transformers, a gigabyte a CPU install never uses; llguidance's masks cost a fraction of a
decode step, it compiles a schema in milliseconds, installs as one dependency-free wheel, and takes Lark
grammars that mix special tokens with embedded JSON schemas, which is what a DeepSeek tool call is.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanoseek.errors import NanoseekError

try:
    import llguidance
except ImportError:  # the [serve] extra installs it; everything else in nanoseek works without
    llguidance = None

# JSON as the API's clients expect it: compact with one space after ':' and ','. Free whitespace would let a
# weak model fill its token budget with blanks before the JSON ever closes.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class GrammarError(NanoseekError, ValueError):
    """A response_format / schema / tool constraint that cannot be compiled (HTTP 400); `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _require_library() -> None:
    if llguidance is None:
        raise GrammarError("structured output needs the llguidance package: pip install 'nanoseek[serve]'")


@dataclass(frozen=True)
class Grammar:
    """A grammar in llguidance's serialized form, and what it constrains (for errors and logs)."""

    spec: str
    kind: str  # "json_object", "json_schema", "tool_call", "lark"

    @staticmethod
    def from_json_schema(schema: Mapping | bool, kind: str = "json_schema") -> "Grammar":
        _require_library()
        try:
            spec = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=_JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"invalid JSON schema: {e}", "response_format") from None
        return Grammar(spec, kind)

    @staticmethod
    def from_lark(lark: str, kind: str = "lark") -> "Grammar":
        _require_library()
        return Grammar(llguidance.LLMatcher.grammar_from_lark(lark), kind)


def json_schema_options() -> dict:
    """The JSON layout options every grammar here uses (for Lark grammars that embed `%json`)."""
    return {"x-guidance": dict(_JSON_OPTIONS)}


def strict_schema(schema: object) -> object:
    """OpenAI's `strict` semantics: objects that do not say otherwise admit no properties beyond theirs."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    is_object = out.get("type") == "object" or (isinstance(out.get("type"), list) and "object" in out["type"]) \
        or "properties" in out
    if is_object and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def response_format_grammar(response_format: Mapping | None) -> Grammar | None:
    """The grammar an API `response_format` asks for; None for plain text (or no response_format)."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise GrammarError("response_format must be an object", "response_format")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return Grammar.from_json_schema({"type": "object"}, kind="json_object")
    if kind != "json_schema":
        raise GrammarError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                           "response_format.type")
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise GrammarError("response_format.json_schema must be an object with 'name' and 'schema'",
                           "response_format.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or not set(name) <= _NAME_CHARS:
        raise GrammarError("response_format.json_schema.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -",
                           "response_format.json_schema.name")
    schema = spec.get("schema", {})
    if not isinstance(schema, (Mapping, bool)):
        raise GrammarError("response_format.json_schema.schema must be a JSON Schema object",
                           "response_format.json_schema.schema")
    strict = spec.get("strict", False)
    if not isinstance(strict, bool):
        raise GrammarError("response_format.json_schema.strict must be a boolean", "response_format.json_schema.strict")
    return Grammar.from_json_schema(strict_schema(dict(schema)) if strict and isinstance(schema, Mapping) else schema)


class GrammarTokenizer:
    """A model's tokenizer as the grammar engine sees it: every token's bytes, the EOS ids, the logits width.

    Built once per model (about a second for a 128K vocabulary). `vocab_size` is the width of the model's
    logits, which may exceed the tokenizer (DeepSeek-V3 pads 128815 tokens to 129280 rows): the extra ids
    are never allowed in a constrained row.
    """

    def __init__(self, hf_tokenizer, eos_token_ids: Sequence[int], vocab_size: int | None = None,
                 threads: int | None = None):
        _require_library()
        eos = [int(i) for i in eos_token_ids]
        if not eos:
            raise ValueError("a grammar tokenizer needs at least one EOS token id")
        n = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.vocab_size = int(vocab_size) if vocab_size is not None else n
        if self.vocab_size < n:
            raise ValueError(f"vocab_size {self.vocab_size} is smaller than the tokenizer's {n} tokens")
        self.n_tokens = n  # ids from here to vocab_size have no text and are never allowed
        self.eos_token_ids = eos
        self.hf = hf_tokenizer
        try:
            self.ll = llguidance.LLTokenizer(hf_tokenizer.to_str(), n_vocab=self.vocab_size, eos_token=eos)
        except ValueError as e:
            raise ValueError(f"structured output cannot read this tokenizer: {e}") from None
        self._threads = threads
        self._executor = None
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | Path, eos_token_ids: Sequence[int], vocab_size: int | None = None) -> "GrammarTokenizer":
        from tokenizers import Tokenizer

        p = Path(path)
        return cls(Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p)), eos_token_ids, vocab_size)

    def token_id(self, text: str) -> int | None:
        return self.hf.token_to_id(text)

    @property
    def executor(self):
        """The thread pool that fills a batch of masks at once (created on first use)."""
        with self._lock:
            if self._executor is None:
                self._executor = llguidance.LLExecutor(self._threads) if self._threads else llguidance.LLExecutor()
            return self._executor

    def compile(self, grammar: Grammar) -> Grammar:
        """Check a grammar against this tokenizer now, so a bad one fails the request before it is queued."""
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar.spec, self.ll)
        if is_error:
            raise GrammarError(f"cannot compile the {grammar.kind.replace('_', ' ')} constraint: {messages[0]}",
                               "response_format" if grammar.kind != "tool_call" else "tools")
        return grammar


class Matcher:
    """The grammar state of one request: which tokens may come next, fed with each token it emits.

    With `trigger_ids` the matcher is inactive until one of those tokens is emitted (the `</think>` that
    ends the reasoning); until then the row is free except for EOS.
    """

    def __init__(self, tokenizer: GrammarTokenizer, grammar: Grammar, trigger_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.grammar = grammar
        self._ll = llguidance.LLMatcher(tokenizer.ll, grammar.spec, log_level=0)
        if self._ll.is_error():
            raise GrammarError(f"cannot compile the {grammar.kind.replace('_', ' ')} constraint: {self._ll.get_error()}",
                               "response_format" if grammar.kind != "tool_call" else "tools")
        self.trigger_ids = frozenset(int(i) for i in trigger_ids)
        self.active = not self.trigger_ids
        self._before = 0  # tokens consumed while inactive, the trigger included
        self._after = 0  # tokens consumed by the grammar
        self._virtual_eos = False  # an EOS after the grammar had already stopped (not in llguidance's history)
        self.error: str | None = None

    @property
    def consumed(self) -> int:
        return self._before + self._after + self._virtual_eos

    def advance(self, token: int) -> bool:
        """Feed one emitted token; False (and `error` set) when the grammar does not allow it."""
        token = int(token)
        if self.error is not None:
            return False
        if not self.active:
            if token in self.tokenizer.eos_token_ids:
                self.error = "the output ended before the constrained answer began"
                return False
            self._before += 1
            self.active = token in self.trigger_ids
            return True
        # llguidance keeps an EOS in its history only when the grammar could still have gone on.
        unrecorded = token in self.tokenizer.eos_token_ids and self._ll.is_stopped()
        if not self._ll.consume_token(token):
            self.error = self._ll.get_error() or f"token {token} is not allowed here"
            return False
        if unrecorded:
            self._virtual_eos = True
        else:
            self._after += 1
        return True

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens`, in order from the current state, the grammar accepts, consuming none of them.

        For speculative decoding: check drafted tokens before advancing, since a matcher that is fed a
        forbidden token stays in its error state (rollback cannot undo that).
        """
        if self.error is not None:
            return 0
        tokens = [int(t) for t in tokens]
        if self.active:
            return self._grammar_prefix(tokens)
        for k, t in enumerate(tokens):
            if t in self.tokenizer.eos_token_ids:
                return k
            if t in self.trigger_ids:
                return k + 1 + self._grammar_prefix(tokens[k + 1:])
        return len(tokens)

    def _grammar_prefix(self, tokens: list[int]) -> int:
        n = self._ll.validate_tokens(tokens) if tokens else 0
        if n < len(tokens) and tokens[n] in self.tokenizer.eos_token_ids:
            # llguidance does not count an EOS here: it is valid iff the n tokens before it complete the answer.
            if n and not self._ll.consume_tokens(tokens[:n]):
                raise RuntimeError(f"llguidance refused tokens it had validated: {self._ll.get_error()}")
            complete = self._ll.is_accepting()
            if n:
                self._ll.rollback(n)
            n += complete
        return n

    def rollback(self, n: int) -> None:
        """Undo the last n advances (rejected speculative drafts)."""
        if n < 0 or n > self.consumed:
            raise ValueError(f"cannot roll back {n} tokens: only {self.consumed} consumed")
        if self.error is not None:
            raise ValueError(f"cannot roll back a matcher in an error state ({self.error})")
        if n and self._virtual_eos:
            self._virtual_eos, n = False, n - 1
        undo = min(n, self._after)
        if undo and not self._ll.rollback(undo):
            raise RuntimeError(f"the grammar engine refused to roll back {undo} tokens: {self._ll.get_error()}")
        self._after -= undo
        n -= undo
        if n:
            self._before -= n
            self.active = not self.trigger_ids  # the trigger, if any, was among the undone tokens

    def is_accepting(self) -> bool:
        """The output so far is a complete answer (EOS is allowed now)."""
        return self.active and self.error is None and self._ll.is_accepting()

    def is_terminated(self) -> bool:
        """Nothing but EOS can follow: the grammar is complete and cannot be extended (or it failed)."""
        return self.error is not None or (self.active and self._ll.is_stopped())

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces from here (e.g. `": "` after a key); may be empty."""
        return list(self._ll.compute_ff_tokens()) if self.active and self.error is None else []

    def fill_row(self, row: torch.Tensor) -> None:
        """This matcher's mask into one bitmask row (its own thread; `fill_masks` does a batch in parallel)."""
        if self.active and self.error is None:
            self._ll.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        else:
            self._fill_static(row)

    def _fill_static(self, row: torch.Tensor) -> None:
        if self.error is not None:  # let the request end
            row.zero_()
            for e in self.tokenizer.eos_token_ids:
                row[e // 32] |= _bit(e)
            return
        row.fill_(-1)  # inactive: everything but EOS and the ids past the tokenizer
        for e in self.tokenizer.eos_token_ids:
            row[e // 32] &= ~_bit(e)
        _clear_tail(row, self.tokenizer.n_tokens)


def _bit(i: int) -> int:
    """The int32 word with bit i % 32 set (bit 31 is the sign bit)."""
    b = 1 << (i % 32)
    return b - (1 << 32) if b >= 1 << 31 else b


def _clear_tail(row: torch.Tensor, vocab_size: int) -> None:
    words = row.numel()
    if vocab_size < words * 32:
        full, rest = divmod(vocab_size, 32)
        if rest:
            row[full] &= (1 << rest) - 1  # keep the low `rest` bits (always below the sign bit)
            full += 1
        row[full:] = 0


def allocate_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """An int32 [batch, ceil(vocab/32)] CPU bitmask (bit j of word w allows token 32 w + j)."""
    return torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def fill_masks(matchers: Sequence[Matcher | None], bitmask: torch.Tensor) -> list[int]:
    """Fill row i of `bitmask` for every matcher i (None: row left alone); returns the filled rows.

    Active matchers are computed in parallel on the tokenizer's thread pool, with the GIL released.
    """
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask.is_contiguous():
        raise ValueError("the bitmask must be a contiguous int32 CPU tensor (see allocate_bitmask)")
    if bitmask.shape[0] < len(matchers):
        raise ValueError(f"bitmask has {bitmask.shape[0]} rows for {len(matchers)} matchers")
    rows, parallel, executor = [], [], None
    for i, m in enumerate(matchers):
        if m is None:
            continue
        rows.append(i)
        if m.active and m.error is None:
            parallel.append((m._ll, i))
            executor = m.tokenizer.executor
        else:
            m.fill_row(bitmask[i])
    if len(parallel) == 1:
        matchers[parallel[0][1]].fill_row(bitmask[parallel[0][1]])
    elif parallel:
        executor.unsafe_compute_mask_ptr(parallel, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])
    return rows


def _bit_positions(words: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
    """(word index, bit index) of every bit equal to `want` (0 or 1) in a flat array of int32 words."""
    bits = np.unpackbits(words.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
    return np.nonzero(bits == want)


_SMALL = 1 << 17  # logits elements under which apply_masks just unpacks the whole mask


def apply_masks(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
    """Set the disallowed logits of `rows` (default: every row the bitmask has) to -inf, in place.

    `logits` is [B, V] on any device; rows not listed are untouched. Real masks are lopsided: inside a
    JSON string nearly every token is allowed, at a structural point only a handful are. Each row is
    handled from its minority side, found from the words that are not all-ones (or not all-zeros): the
    few disallowed ids get -inf, or the row becomes -inf and the few allowed logits are put back. That
    touches far fewer elements than a dense [B, V] mask, with a fixed number of vectorized calls for the
    whole batch; rows whose masks are balanced (neither side small), and small batches of a small vocabulary,
    take the dense unpacked mask.
    """
    B, V = logits.shape
    if bitmask.shape[1] * 32 < V:
        raise ValueError(f"bitmask covers {bitmask.shape[1] * 32} tokens, the logits have {V}")
    rows_np = np.arange(min(B, bitmask.shape[0])) if rows is None else np.asarray(list(rows), dtype=np.int64)
    if rows_np.size == 0:
        return logits
    n_words = (V + 31) // 32
    words = bitmask.numpy()[rows_np, :n_words]  # [R, W]
    dev = logits.device
    if rows_np.size * V <= _SMALL:  # a few calls on a small mask beat the bookkeeping below
        banned = torch.from_numpy(np.unpackbits(np.invert(words).view(np.uint8), axis=1, bitorder="little")[:, :V])
        banned = banned.view(torch.bool).to(dev)
        if rows_np.size == B and (rows_np == np.arange(B)).all():
            return logits.masked_fill_(banned, float("-inf"))
        idx = torch.from_numpy(rows_np).to(dev)
        logits[idx] = logits[idx].masked_fill(banned, float("-inf"))
        return logits
    all_on, all_off = words == -1, words == 0
    mostly_off = all_off.sum(1) > all_on.sum(1)
    minority = np.where(mostly_off, n_words - all_off.sum(1), n_words - all_on.sum(1))  # words to unpack
    balanced = minority * 32 > max(V // 8, 64)
    ninf = torch.tensor(float("-inf"), device=dev, dtype=logits.dtype)

    def positions(select: np.ndarray, want: int) -> tuple[torch.Tensor, torch.Tensor]:
        r, w = np.nonzero(select)
        k, j = _bit_positions(words[r, w], want)
        cols = w[k].astype(np.int64) * 32 + j
        ok = cols < V
        return (torch.from_numpy(rows_np[r[k][ok]]).to(dev), torch.from_numpy(cols[ok]).to(dev))

    dense_rows = ~mostly_off & ~balanced  # mostly allowed: -inf on the few disallowed ids
    if dense_rows.any():
        logits.index_put_(positions(~all_on & dense_rows[:, None], 0), ninf)
    sparse_rows = mostly_off & ~balanced  # mostly disallowed: keep the few allowed logits, -inf the rest
    if sparse_rows.any():
        r_, c_ = positions(~all_off & sparse_rows[:, None], 1)
        kept = logits[r_, c_]
        logits.index_fill_(0, torch.from_numpy(rows_np[sparse_rows]).to(dev), float("-inf"))
        logits.index_put_((r_, c_), kept)
    if balanced.any():
        banned = np.unpackbits(np.invert(words[balanced]).view(np.uint8), axis=1, bitorder="little")[:, :V]
        idx = torch.from_numpy(rows_np[balanced]).to(dev)
        logits[idx] = logits[idx].masked_fill(torch.from_numpy(banned).view(torch.bool).to(dev), float("-inf"))
    return logits


def allowed_tokens(bitmask_row: torch.Tensor, vocab_size: int) -> list[int]:
    """The token ids one bitmask row allows (for tests and debugging)."""
    w = bitmask_row.reshape(-1).cpu().numpy()
    k, j = _bit_positions(w, 1)
    return [int(c) for c in k.astype(np.int64) * 32 + j if c < vocab_size]
