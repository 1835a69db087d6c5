"""A chat template for the tiny test checkpoints, built locally (ChatML-style markers as special tokens)."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
MARKERS = ("<|im_start|>", "<|im_end|>")


def add_chat_template(folder: Path) -> Path:
    """Give the tokenizer saved in ``folder`` the two markers as special tokens and a chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": list(MARKERS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def conversations(n: int) -> list[dict]:
    """``n`` distinct two-turn conversations as rows with a ``messages`` column."""
    return [{"id": i, "messages": [{"role": "user", "content": f"question {i}: how do tides form near coast {i}?"},
                                   {"role": "assistant", "content": f"answer {i}: the moon pulls the sea {i} times."}]}
            for i in range(n)]
