"""Prompts: given in the input, or a caption of the REFERENCE (the background) put in a template.

``prompt_template`` receives ``{caption}`` and ``{category}`` (the input's ``category``, empty when
unknown); a ``translate`` component fills ``prompt_zh`` from ``prompt`` when the input has none.
"""

from __future__ import annotations

import re
from typing import Any


def from_template(template: str, caption: str, meta: dict[str, Any]) -> str:
    """The English prompt: the template filled in, spaces collapsed."""
    category = meta.get("category")
    text = template.format(caption=caption.strip(), category=category if isinstance(category, str) else "")
    return re.sub(r"\s+", " ", text).strip(" ,")


def given_prompt(meta: dict[str, Any]) -> str | None:
    """The input's English prompt, stripped, or None when missing or blank."""
    prompt = meta.get("prompt")
    return prompt.strip() if isinstance(prompt, str) and prompt.strip() else None
