"""DeepSeek-V3's special-token spellings (fullwidth bars U+FF5C, U+2581 for spaces), in id order.

The order of SPECIAL_TOKENS fixes the ids of every tokenizer nanoseek trains: bos=0, eos=1, pad=2, User,
Assistant, System, `<think>`, `</think>` (7), then the nine tool-call tokens (8-16). The tool tokens come
last, so tokenizers trained before they existed keep the same first eight ids.

The tool-call markup has the same spellings in DeepSeek-V3, R1 and V3.1 (their tokenizer_config.json chat
templates); nanoseek.data.chat_template renders it.
"""

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"  # DeepSeek-V3's own spelling of the pad token
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SYSTEM = "<｜System｜>"
THINK = "<think>"
END_THINK = "</think>"
# Tool-call markup.
TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
TOOL_OUTPUTS_END = "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"
TOOL_TOKENS: tuple[str, ...] = (TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP,
                                TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END)
# Order fixes the ids: bos=0, eos=1, pad=2, ..., </think>=7, then the tool tokens 8-16 (appended, so the
# first eight ids are those of tokenizers trained before tool calls existed).
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, USER, ASSISTANT, SYSTEM, THINK, END_THINK, *TOOL_TOKENS)

