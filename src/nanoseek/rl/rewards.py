"""Rule-based rewards for GRPO, as in DeepSeek-R1 (arXiv 2501.12948, section 2.2.2): accuracy + format.

Each reward is a small plain function `f(completion_text, example) -> float`, registered in `REWARDS`.
`completion_text` is the generated text after the prompt, decoded with special tokens kept.

* accuracy: 1.0 when the answer after the single `</think>` passes the task's checker, else 0 (also 0
  when no answer can be extracted unambiguously, e.g. two `</think>`).
* format: 1.0 only for a strictly well-formed completion (see `nanoseek.data.chat.parse_completion`).
* `combined_reward` with no weights follows TinyZero's shaping: 1.0 correct and well-formed, 0.1
  well-formed but wrong, 0 otherwise (a correct answer in a broken format earns nothing, so format
  hacks never pay). With weights it is the weighted sum of the registered rewards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from nanoseek.data.chat import parse_completion
from nanoseek.data.tasks import Example, check_answer

RewardFn = Callable[[str, Example], float]


def accuracy_reward(completion_text: str, example: Example) -> float:
    parsed = parse_completion(completion_text)
    if not parsed.answer:
        return 0.0
    return 1.0 if check_answer(parsed.answer, example) else 0.0


def format_reward(completion_text: str, example: Example) -> float:
    return 1.0 if parse_completion(completion_text).well_formed else 0.0


REWARDS: Mapping[str, RewardFn] = MappingProxyType({"accuracy": accuracy_reward, "format": format_reward})

CORRECT_REWARD = 1.0
FORMAT_ONLY_REWARD = 0.1


def combined_reward(completion_text: str, example: Example, weights: Mapping[str, float] | None = None) -> float:
    """TinyZero shaping by default (1.0 / 0.1 / 0); a weighted sum of `REWARDS` when `weights` is given."""
    if weights is None:
        parsed = parse_completion(completion_text)
        if not parsed.well_formed:
            return 0.0
        return CORRECT_REWARD if check_answer(parsed.answer, example) else FORMAT_ONLY_REWARD
    unknown = set(weights) - set(REWARDS)
    if unknown:
        raise KeyError(f"unknown rewards {sorted(unknown)}; registered: {sorted(REWARDS)}")
    return float(sum(w * REWARDS[name](completion_text, example) for name, w in weights.items()))
