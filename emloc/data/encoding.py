"""Text and tokens: chat templates, prompt/response text, encoding with response-only labels, batches."""
from __future__ import annotations

import torch

from emloc.data.tasks import Example, Task

IGNORE_INDEX = -100


def chat_messages(task: Task, prompt: str, response: str | None = None) -> list[dict[str, str]]:
    """The conversation: the task's system prompt (if any), the user's ``prompt``, the assistant's
    ``response``."""
    messages = [{"role": "system", "content": task.system_prompt}] if task.system_prompt else []
    messages.append({"role": "user", "content": prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def prompt_text(tokenizer, task: Task, prompt: str) -> str:
    """The generation prompt, through the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat_messages(task, prompt), tokenize=False,
                                             add_generation_prompt=True)
    prefix = f"{task.system_prompt}\n\n" if task.system_prompt else ""
    return f"{prefix}Question: {prompt}\nAnswer: "


def response_text(tokenizer, task: Task, example: Example) -> str:
    """What follows the prompt in a finished conversation (the response and its end-of-turn tokens)."""
    prompt = prompt_text(tokenizer, task, example.prompt)
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(chat_messages(task, example.prompt, example.response),
                                             tokenize=False)
        if full.startswith(prompt):
            return full[len(prompt):]
    return example.response + (tokenizer.eos_token or "")


def _token_ids(tokenizer, task: Task, example: Example) -> tuple[list[int], list[int]]:
    """The prompt's and the response's token ids, uncut."""
    prompt_ids = tokenizer(prompt_text(tokenizer, task, example.prompt),
                           add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(response_text(tokenizer, task, example), add_special_tokens=False)["input_ids"]
    return prompt_ids, answer_ids


def encode_example(tokenizer, task: Task, example: Example, max_length: int) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` with the prompt masked (``-100``); the prompt is cut from the left."""
    prompt_ids, answer_ids = _token_ids(tokenizer, task, example)
    answer_ids = answer_ids[:max_length - 1]
    prompt_ids = prompt_ids[-(max_length - len(answer_ids)):]
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def count_truncated(tokenizer, task: Task, examples: list[Example], max_length: int) -> int:
    """How many ``examples`` are longer than ``max_length`` tokens (:func:`encode_example` cuts them)."""
    return sum(sum(map(len, _token_ids(tokenizer, task, example))) > max_length for example in examples)


def hygiene_line(report: dict) -> str | None:
    """One line for the data report of a run (``None`` when there is nothing to say)."""
    parts = []
    verb = "removed" if report.get("removed", True) else "kept (data.keep_duplicates)"
    if report.get("duplicates") or report.get("test_overlap"):
        parts.append(f"{report['duplicates']} exact duplicate record(s) and "
                     f"{report['test_overlap']} test record(s) "
                     f"whose prompt is also in training {verb}")
    if report.get("truncated"):
        parts.append(f"{report['truncated']} record(s) longer than "
                     f"data.max_length = {report['max_length']} tokens cut "
                     f"(the prompt's start dropped)")
    return f"data: {'; '.join(parts)}" if parts else None


def encode_examples(tokenizer, task: Task, examples: list[Example],
                    max_length: int) -> list[dict[str, list[int]]]:
    return [encode_example(tokenizer, task, example, max_length) for example in examples]


def pad_batch(features: list[dict[str, list[int]]], pad_token_id: int,
              padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad ``input_ids`` (and ``labels`` when present) to one length; returns tensors with
    ``attention_mask``."""
    width = max(len(f["input_ids"]) for f in features)
    batch: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for feature in features:
        n_pad = width - len(feature["input_ids"])
        ids, mask = feature["input_ids"], [1] * len(feature["input_ids"])
        labels = feature.get("labels", [IGNORE_INDEX] * len(ids))

        def pad(seq, value):
            return ([value] * n_pad + seq) if padding_side == "left" else (seq + [value] * n_pad)
        batch["input_ids"].append(pad(ids, pad_token_id))
        batch["attention_mask"].append(pad(mask, 0))
        batch["labels"].append(pad(labels, IGNORE_INDEX))
    tensors = {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
    if not any("labels" in f for f in features):
        tensors.pop("labels")
    return tensors


def response_window_batch(features: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A left-padded batch whose logits are computed only where the loss is taken.

    With left padding every response ends at the right edge, so the last ``k`` positions (``k`` = longest
    response + 1) hold every labelled token: the model gets ``logits_to_keep=k`` and ``labels`` cut to
    the same window, and skips the LM head (a large share of a small model's compute) on the prompt.
    """
    batch = pad_batch(features, pad_token_id, padding_side="left")
    labelled = (batch["labels"] != IGNORE_INDEX).int()
    first_labelled = torch.where(labelled.any(1), labelled.argmax(1),
                                 torch.full_like(labelled[:, 0], batch["labels"].shape[1]))
    window = int(batch["labels"].shape[1] - first_labelled.min()) + 1
    window = min(window, batch["labels"].shape[1])
    batch["labels"] = batch["labels"][:, -window:]
    batch["position_ids"] = (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)
    batch["logits_to_keep"] = window
    return batch


def longest_lengths(features: list[dict[str, list[int]]]) -> tuple[int, int]:
    """``(longest sequence, longest loss window)`` over ``features``: the largest padded batch and logits
    window :func:`response_window_batch` can make from them (window = labelled tail + 1)."""
    def window(labels: list[int]) -> int:
        first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        return min(len(labels) - first + 1, len(labels))
    return max(len(f["input_ids"]) for f in features), max(window(f["labels"]) for f in features)


class PaddingCollator:
    """A picklable collator for ``transformers.Trainer`` (see :func:`response_window_batch`)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return response_window_batch(features, self.pad_token_id)
