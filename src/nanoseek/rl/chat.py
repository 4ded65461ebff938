"""The R1 chat format: render prompts and completions, and parse completions strictly.

DeepSeek-R1 (arXiv 2501.12948, section 2.2) asks for the reasoning inside `<think>...</think>` followed by
the answer. As in R1's released chat template, the prompt itself opens the think block:

    bos [system] <｜User｜>question<｜Assistant｜><think>\\n   <- prompt (render_prompt)
    reasoning\\n</think>\\nanswer<｜end▁of▁sentence｜>        <- completion (render_completion)

Format rewards get hacked unless parsing is strict (REFERENCE.md section 5), so `parse_completion`
accepts exactly one `</think>`, at most one `<think>` (only at the very start), non-empty reasoning and
answer, no other special tokens, and the answer closed by eos with nothing after it (a completion cut off
at the length limit is not well formed). `split_reasoning` is the lenient, streaming
counterpart the server uses to fill `reasoning_content`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nanoseek.data.tokenizer import (ASSISTANT, BOS, END_THINK, EOS, PAD, SYSTEM, THINK, USER, Tokenizer)

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


def _hold_back(text: str, *tags: str) -> str:
    """`text` minus a trailing proper prefix of any tag: it may be a tag still being generated."""
    held = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), held, -1):
            if text.endswith(tag[:k]):
                held = k
                break
    return text[: len(text) - held]


def split_reasoning(text: str, think_opened: bool) -> tuple[str, str]:
    """(reasoning, content) of generated text, for the API's `reasoning_content` and `content`.

    `think_opened` says the prompt already ended with `<think>` (our template does); otherwise a
    leading `<think>` in the text opens the block, and text without one is all content. Works on
    partial text while streaming: a half-generated tag at the end is held back, and each call's output
    extends the previous call's, so callers can stream the differences. Text from eos on is dropped.
    """
    text = text.partition(EOS)[0]
    if not think_opened:
        head = text.lstrip()
        if head.startswith(THINK):
            text = head[len(THINK):]
        elif THINK.startswith(head):
            return "", ""  # maybe the start of <think>: wait for more
        else:
            return "", _hold_back(head, EOS)
    if END_THINK in text:
        reasoning, _, content = text.partition(END_THINK)
        return reasoning.strip(), _hold_back(content.lstrip(), EOS)
    return _hold_back(text, END_THINK, EOS).strip(), ""
