"""Byte-level BPE tokenizer with DeepSeek's special tokens and the DeepSeek-R1 chat template
(defined in nanoseek.data.special_tokens and nanoseek.data.chat_template).

Trained with the `tokenizers` library and saved as the three files Hugging Face tools read
(`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`), so a trained directory loads in
`transformers.AutoTokenizer` with identical ids and a working `apply_chat_template`.

Special tokens keep DeepSeek-V3's spellings (fullwidth bars, U+2581 for spaces) and fixed ids: 0 bos,
1 eos, 2 pad, then User, Assistant, System, `<think>`, `</think>`, then DeepSeek's nine tool-call tokens
(`<｜tool▁calls▁begin｜>` ... `<｜tool▁output▁end｜>`, ids 8-16). Digits are split one per token
before BPE: tiny models learn arithmetic far faster when every number is spelled digit by digit.

The chat template (nanoseek.data.chat_template) follows DeepSeek-R1's: bos, the system text, `<｜User｜>`
turns, `<｜Assistant｜>` turns closed by eos (earlier turns lose their reasoning), and a generation prompt
that opens `<think>\n`; tool calls and the thinking switch follow DeepSeek-V3.1.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from nanoseek.data.chat_template import CHAT_TEMPLATE, register_filters
from nanoseek.data.special_tokens import (ASSISTANT, BOS, END_THINK, EOS, PAD, SPECIAL_TOKENS, SYSTEM, THINK,
                                          TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END,
                                          TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END, TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END,
                                          TOOL_SEP, TOOL_TOKENS, USER)
from nanoseek.errors import DataError

__all__ = ["ASSISTANT", "BOS", "CHAT_TEMPLATE", "END_THINK", "EOS", "PAD", "SPECIAL_TOKENS", "SYSTEM", "THINK",
           "TOOL_CALL_BEGIN", "TOOL_CALL_END", "TOOL_CALLS_BEGIN", "TOOL_CALLS_END", "TOOL_OUTPUT_BEGIN",
           "TOOL_OUTPUT_END", "TOOL_OUTPUTS_BEGIN", "TOOL_OUTPUTS_END", "TOOL_SEP", "TOOL_TOKENS", "USER",
           "StreamDecoder", "Tokenizer", "load_tokenizer", "train_tokenizer"]


@lru_cache(maxsize=8)
def _compiled_template(source: str):
    """The chat template compiled once: building a jinja environment per call was a visible share of a
    GRPO rollout, which renders every prompt of the step."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    register_filters(env)
    return env.from_string(source)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character map used by the byte-level pre-tokenizer."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` with the ids of DeepSeek's special tokens."""

    def __init__(self, hf: _HFTokenizer, chat_template: str = CHAT_TEMPLATE, model_max_length: int = 4096,
                 bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None):
        """bos/eos/pad_token: another model's spellings (its tokenizer_config.json); default DeepSeek's.
        A tokenizer without a BOS token is allowed only when bos_token is given as "" (bos_id is then None)."""
        self.hf = hf
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        bos = BOS if bos_token is None else bos_token
        eos = eos_token or EOS
        missing = [t for t in (bos, eos) if t and hf.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks required special tokens {missing}")
        self.bos_token, self.eos_token = bos or None, eos
        self.bos_id: int | None = hf.token_to_id(bos) if bos else None
        self.eos_id: int = hf.token_to_id(eos)
        pad = hf.token_to_id(pad_token or PAD)
        self.pad_id: int = self.eos_id if pad is None else pad
        # Present in every tokenizer we train; may be None for a foreign tokenizer.json.
        self.user_id: int | None = hf.token_to_id(USER)
        self.assistant_id: int | None = hf.token_to_id(ASSISTANT)
        self.system_id: int | None = hf.token_to_id(SYSTEM)
        self.think_id: int | None = hf.token_to_id(THINK)
        self.end_think_id: int | None = hf.token_to_id(END_THINK)
        # The tool-call markup; a tokenizer trained before it existed has none (tool calls then unavailable).
        self.tool_ids: dict[str, int] = {t: hf.token_to_id(t) for t in TOOL_TOKENS if hf.token_to_id(t) is not None}
        self.special_ids: frozenset[int] = frozenset(
            i for i in (hf.token_to_id(t.content) for t in hf.get_added_tokens_decoder().values() if t.special)
            if i is not None
        )
        self._id_bytes: list[bytes] | None = None
        self._plain: _HFTokenizer | None = None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        # Special-token strings inside `text` become their single ids (chat rendering relies on it).
        return self.hf.encode(text, add_special_tokens=add_bos).ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of text with special-token parsing off: a `<｜User｜>` typed by a user stays plain text.

        Message content (user, system, tool and assistant text) must be encoded this way; only the chat
        template's own markup may become control tokens.
        """
        if self._plain is None:
            plain = _HFTokenizer.from_str(self.hf.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=add_bos)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (specials: their UTF-8 spelling)."""
        if self._id_bytes is None:
            dec = _byte_decoder()
            added = {t.content for t in self.hf.get_added_tokens_decoder().values()}
            table = []
            for i in range(self.vocab_size):
                tok = self.hf.id_to_token(i) or ""
                if tok in added or any(c not in dec for c in tok):
                    table.append(tok.encode("utf-8"))
                else:
                    table.append(bytes(dec[c] for c in tok))
            self._id_bytes = table
        if not 0 <= token_id < len(self._id_bytes):
            raise ValueError(f"token id {token_id} out of range for vocab size {len(self._id_bytes)}")
        return self._id_bytes[token_id]

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = False,
                            tools: Sequence[Mapping] | None = None, **template_kwargs) -> str:
        """Render messages to text exactly as transformers' `apply_chat_template(tokenize=False)` does.

        `tools` and keyword options (e.g. `thinking=False`) go to the template as transformers passes them.
        """
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m:
                raise ValueError(f"message {i} must be a mapping with a 'role', got {m!r}")
            if m["role"] not in ("system", "user", "assistant", "tool"):
                raise ValueError(f"message {i} has unknown role {m['role']!r} (system, user, assistant or tool)")
            if "content" not in m and not (m["role"] == "assistant" and m.get("tool_calls")):
                raise ValueError(f"message {i} ({m['role']}) has no 'content'")
        return _compiled_template(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=BOS, eos_token=EOS,
            tools=list(tools) if tools else None, **template_kwargs)

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special=skip_special)

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(out / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": self.hf.id_to_token(self.pad_id),
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "chat_template": self.chat_template,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": config["pad_token"],
                    "additional_special_tokens": [t for t in SPECIAL_TOKENS[3:] if self.hf.token_to_id(t) is not None]}
        (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class StreamDecoder:
    """Incremental detokenizer for streaming: feed ids one at a time, get text once it is valid UTF-8.

    Byte-level BPE splits multi-byte characters across tokens; decoding each token alone would print
    replacement characters. Bytes are buffered until they form complete characters; a byte sequence
    that can never be valid UTF-8 comes out as U+FFFD, as a full decode would.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self.skip_special and token_id in self.tokenizer.special_ids:
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(int(token_id)))

    def flush(self) -> str:
        """Whatever is still buffered (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None,
                    model_max_length: int = 4096, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on `texts`; save the HF files to `out_dir` when given."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
                         f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    hf = _HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    # encode(add_special_tokens=True) prepends bos, as DeepSeek's own tokenizer does.
    hf.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
    )
    for i, t in enumerate(SPECIAL_TOKENS):
        if hf.token_to_id(t) != i:
            raise RuntimeError(f"special token {t!r} got id {hf.token_to_id(t)}, expected {i}")
    tok = Tokenizer(hf, model_max_length=model_max_length)
    if out_dir is not None:
        tok.save(out_dir)
    return tok


class TokenizerError(DataError, FileNotFoundError):
    """No readable tokenizer at a path (a FileNotFoundError too, as it always was)."""


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a directory holding tokenizer.json (and optionally tokenizer_config.json), or a tokenizer.json."""
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not p.exists():
        raise TokenizerError("no such tokenizer directory", p, "check the path")
    if not file.is_file():
        raise TokenizerError("no tokenizer.json", p, "a model saved with nanoseek.save(..., tokenizer_dir=...) or "
                                                     "by nanoseek's commands has one")
    if file.name != "tokenizer.json":
        raise TokenizerError("a file, not a tokenizer directory", p, f"pass the folder that holds it: {p.parent}")
    try:
        hf = _HFTokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises a bare Exception for a corrupt file
        raise DataError(f"tokenizer.json is not a readable tokenizer ({e})", file,
                        "restore the file, or export the model again") from None
    template, max_len = CHAT_TEMPLATE, 4096
    cfg = _json_file(file.parent / "tokenizer_config.json")
    template = cfg.get("chat_template") or template
    max_len = int(cfg.get("model_max_length", max_len)) if isinstance(cfg.get("model_max_length"), int) else max_len
    bos, eos, pad = (_token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
    # generation_config.json names ids; an eos_token_id list's first entry is the primary EOS.
    gen = _json_file(file.parent / "generation_config.json")
    if eos is None and gen.get("eos_token_id") is not None:
        first = gen["eos_token_id"][0] if isinstance(gen["eos_token_id"], list) else gen["eos_token_id"]
        eos = hf.id_to_token(int(first)) if isinstance(first, int) else None
    if bos is None and "bos_token_id" in gen:  # an explicit null: the model has no BOS
        bos = hf.id_to_token(int(gen["bos_token_id"])) if isinstance(gen["bos_token_id"], int) else ""
    if bos is None and "bos_token" in cfg:  # tokenizer_config.json says "bos_token": null
        bos = ""
    return Tokenizer(hf, chat_template=template, model_max_length=max_len, bos_token=bos, eos_token=eos, pad_token=pad)


def _json_file(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path.name} is not valid JSON ({e})", path,
                        "restore the file, or export the model again") from None
    if not isinstance(data, dict):
        raise DataError(f"{path.name} must hold a JSON object", path, "restore the file, or export the model again")
    return data


def _token_text(v: object) -> str | None:
    """A token as tokenizer_config.json writes it: a string or an AddedToken dict ({"content": ...})."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None
