"""The DeepSeek-R1 chat format: how prompts and completions are rendered and parsed (strictly, for
rewards). The special tokens are in nanoseek.data.special_tokens and the template (tools, tool calls,
thinking on/off) in nanoseek.data.chat_template; both are re-exported here.

DeepSeek-R1 (arXiv 2501.12948, section 2.2) asks for the reasoning inside `<think>...</think>` followed by
the answer. As in R1's released chat template, the prompt itself opens the think block:

    bos [system] <｜User｜>question<｜Assistant｜><think>\\n   <- prompt (render_prompt)
    reasoning\\n</think>\\nanswer<｜end▁of▁sentence｜>        <- completion (render_completion)

Special tokens keep DeepSeek-V3's spellings (fullwidth bars, U+2581 for spaces). Format rewards get
hacked (repeated closing tags) unless parsing is strict, so `parse_completion` accepts exactly one
`</think>`, at most one `<think>` (only at the very start), non-empty reasoning and answer, no other
special tokens, and the answer closed by eos with nothing after it (a completion cut off at the length
limit is not well formed). The lenient, streaming split of reasoning and answer for the API
(`reasoning_content`) is nanoseek.infer.text.TextStream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nanoseek.data.chat_template import CHAT_TEMPLATE  # noqa: F401 (re-exported)
from nanoseek.data.special_tokens import ASSISTANT, BOS, END_THINK, EOS, PAD, SYSTEM, THINK, USER  # noqa: F401

if TYPE_CHECKING:
    from nanoseek.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")

_FORBIDDEN_IN_COMPLETION = (BOS, PAD, USER, ASSISTANT, SYSTEM)


@dataclass(frozen=True)
class Parsed:
    reasoning: str
    answer: str  # "" when no answer can be extracted unambiguously
    well_formed: bool


def _as_messages(messages_or_question: str | Sequence[Mapping[str, str]], system: str | None) -> list[Mapping[str, str]]:
    if isinstance(messages_or_question, str):
        msgs: list[Mapping[str, str]] = [{"role": "user", "content": messages_or_question}]
    else:
        msgs = list(messages_or_question)
    if system:
        msgs = [{"role": "system", "content": system}, *msgs]
    return msgs


def render_prompt_text(messages_or_question: str | Sequence[Mapping[str, str]], tokenizer: Tokenizer,
                       system: str | None = None) -> str:
    return tokenizer.apply_chat_template(_as_messages(messages_or_question, system), add_generation_prompt=True)


def render_prompt(messages_or_question: str | Sequence[Mapping[str, str]], tokenizer: Tokenizer,
                  system: str | None = None) -> list[int]:
    """Token ids of the prompt, ending with `<｜Assistant｜><think>\\n` (the think block is open)."""
    # The template writes bos itself, so the tokenizer must not add another.
    return tokenizer.encode(render_prompt_text(messages_or_question, tokenizer, system), add_bos=False)


def render_completion(reasoning: str, answer: str) -> str:
    """Completion text that follows the prompt: `reasoning\\n</think>\\nanswer<eos>`."""
    return f"{reasoning}\n{END_THINK}\n{answer}{EOS}"


def encode_sft(question: str | Sequence[Mapping[str, str]], reasoning: str, answer: str, tokenizer: Tokenizer,
               system: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) for SFT: the loss goes on the completion ids only."""
    return render_prompt(question, tokenizer, system), tokenizer.encode(render_completion(reasoning, answer))


def transcript_text(question: str, reasoning: str, answer: str) -> str:
    """One full exchange as plain text, without bos/eos (shards add them): what pretraining sees."""
    return f"{USER}{question}{ASSISTANT}{THINK}\n{reasoning}\n{END_THINK}\n{answer}"


def parse_completion(text: str) -> Parsed:
    """Split a completion (decoded with special tokens kept) into reasoning and answer, strictly."""
    body, has_eos, after_eos = text.partition(EOS)
    n_open, n_close = body.count(THINK), body.count(END_THINK)
    # The end token is required: a completion cut off at the length limit is not a finished answer.
    ok = bool(has_eos) and not after_eos and n_close == 1 and n_open <= 1 \
        and not any(t in body for t in _FORBIDDEN_IN_COMPLETION)
    if n_close != 1:
        return Parsed(reasoning=body.strip(), answer="", well_formed=False)
    reasoning, _, answer = body.partition(END_THINK)
    stripped = reasoning.lstrip()
    if n_open == 1:
        if stripped.startswith(THINK):
            reasoning = stripped[len(THINK):]
        else:
            ok = False  # a <think> in the middle of the reasoning
    reasoning, answer = reasoning.strip(), answer.strip()
    ok = ok and bool(reasoning) and bool(answer) and THINK not in reasoning
    return Parsed(reasoning=reasoning, answer=answer, well_formed=ok)
