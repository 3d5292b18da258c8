"""A user's text as prompt token ids: the one encoding the CLI, the evaluation and the layer
picker share, so that a prompt means the same tokens wherever it is built."""

from __future__ import annotations


def has_chat_template(tokenizer) -> bool:
  return bool(getattr(tokenizer, "chat_template", None))


def chat_text(tokenizer, text: str) -> str:
  """`text` as one user turn of the tokenizer's chat template, with the assistant's turn opened."""
  return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, text: str, chat: bool | None = None) -> list[int]:
  """Token ids of `text`: as a chat turn when `chat` (None: where the tokenizer has a template),
  else as plain text with the tokenizer's special tokens."""
  if has_chat_template(tokenizer) if chat is None else chat:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))
  return list(tokenizer(text)["input_ids"])
