"""R1-style reasoning: chat format, rewards, SFT, GRPO, distillation and evaluation (arXiv 2501.12948)."""
