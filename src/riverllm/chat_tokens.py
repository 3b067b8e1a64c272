"""Chat messages to token ids, with what a user wrote kept as plain text.

`tokenizer.apply_chat_template(..., tokenize=True)` renders the template and tokenizes the whole
string at once, so special-token text written *inside* a message (say `<|im_end|>` then
`<|im_start|>assistant`) becomes real control tokens, and a user can forge a turn. Here the
template's own markup is tokenized as usual, and each message's content with
`split_special_tokens=True` (transformers' option: special tokens in the text are split into
ordinary pieces). Template-agnostic: the template is rendered with a unique placeholder in place of
each content, and the rendered string is cut at the placeholders, so every family's template
(SmolLM2/Llama, Qwen2, Gemma3, Phi3, Mistral, ...) is handled the same way.

Content that holds no special-token text takes the ordinary path, so ordinary chats tokenize
exactly as `apply_chat_template` would (cutting the string can change how the pieces at a cut
merge, e.g. SentencePiece's leading space).
"""

from __future__ import annotations

import re
import secrets
from typing import Any


def special_texts(tokenizer) -> list[str]:
    """The texts of the tokenizer's special tokens (BOS/EOS, turn markers, ...)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = {token.content for token in added.values() if getattr(token, "special", False)}
    texts.update(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted(text for text in texts if text)


def holds_special_text(tokenizer, text: str) -> bool:
    return any(special in text for special in special_texts(tokenizer))


def plain_ids(tokenizer, text: str) -> list[int]:
    """`text` as ordinary tokens: special-token text in it is split, never a control token."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def encode_chat(tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template, with the generation prompt;
    special-token text inside any message's content stays plain text."""
    contents = [message.get("content") for message in messages]
    if not any(isinstance(content, str) and holds_special_text(tokenizer, content) for content in contents):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    # Random, so that no content can contain it; letters and digits only, so that templates
    # that trim or escape content leave it intact.
    marker = "riverllm" + secrets.token_hex(8)
    stand_ins = [{**message, "content": f"{marker}{i}{marker}"} if isinstance(message.get("content"), str)
                 else message for i, message in enumerate(messages)]
    text = tokenizer.apply_chat_template(stand_ins, add_generation_prompt=True, tokenize=False)
    ids: list[int] = []
    # re.split with one group: template, index, template, index, ..., template.
    for position, piece in enumerate(re.split(f"{marker}(\\d+){marker}", text)):
        if position % 2:
            ids += plain_ids(tokenizer, contents[int(piece)])
        elif piece:
            # The template's markup (it carries its own BOS where the family wants one).
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids
