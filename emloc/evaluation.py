"""Evaluation: exact-match accuracy by greedy generation and mean response-token loss."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from emloc.data import Example, TaskData, encode_examples, pad_batch, prompt_text, response_window_batch
from emloc.errors import EmlocError


@torch.no_grad()
def response_loss(model: nn.Module, features: list[dict], pad_token_id: int, batch_size: int = 32) -> float:
    """Mean cross-entropy over response tokens (prompt tokens are masked out)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(features), batch_size):
        batch = response_window_batch(features[start:start + batch_size], pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device),
                       position_ids=batch["position_ids"].to(device),
                       logits_to_keep=batch["logits_to_keep"]).logits.float()
        batch["labels"] = batch["labels"].to(device)
        targets = batch["labels"][:, 1:]
        losses = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100,
                                             reduction="sum")
        total += float(losses)
        count += int((targets != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, data: TaskData, examples: list[Example],
                     max_new_tokens: int = 8, batch_size: int = 32) -> list[str]:
    """Greedy answers for ``examples``' prompts, decoded without special tokens."""
    device = next(model.parameters()).device
    answers = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        features = [{"input_ids": tokenizer(prompt_text(tokenizer, data.task, e.prompt),
                                            add_special_tokens=False)["input_ids"]}
                    for e in chunk]
        batch = pad_batch(features, tokenizer.pad_token_id, padding_side="left")
        output = model.generate(input_ids=batch["input_ids"].to(device),
                                attention_mask=batch["attention_mask"].to(device),
                                max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return answers


def evaluate_model(model: nn.Module, tokenizer, data: TaskData, max_length: int = 128,
                   max_new_tokens: int = 8, batch_size: int = 32) -> dict:
    """``{"accuracy", "loss", "n", "predictions", "correct"}`` on ``data.test``."""
    was_training = model.training
    model.eval()
    features = encode_examples(tokenizer, data.task, data.test, max_length)
    loss = response_loss(model, features, tokenizer.pad_token_id, batch_size)
    predictions = generate_answers(model, tokenizer, data, data.test, max_new_tokens, batch_size)
    correct = [data.is_correct(p, e) for p, e in zip(predictions, data.test)]
    model.train(was_training)
    return {"accuracy": sum(correct) / max(len(correct), 1), "loss": loss, "n": len(correct),
            "predictions": predictions, "correct": correct}


def evaluate_variants(variants: dict, tokenizer, data: TaskData, max_length: int, max_new_tokens: int,
                      batch_size: int, progress: bool = True) -> dict[str, dict]:
    """``variants``: name -> a zero-argument callable giving a context manager that yields the model."""
    results = {}
    for name, open_variant in tqdm(variants.items(), desc="evaluation", disable=not progress):
        with open_variant() as model:
            results[name] = evaluate_model(model, tokenizer, data, max_length, max_new_tokens, batch_size)
    return results


def item_correctness(results: dict, data: TaskData) -> dict[str, list[int]]:
    """Per variant, 0/1 exact-match correctness of each test item, re-scored from a ``results.json``.

    ``results["predictions"][variant]`` (``n`` strings) is checked against ``data.test`` (``n`` examples) with
    the task's own checker, so ``data`` must be the split the run was evaluated on (``run.data``); a record
    whose length or accuracy disagrees with ``results["variants"]`` is refused.
    """
    correct = {}
    for variant, predictions in results["predictions"].items():
        if len(predictions) != len(data.test):
            raise EmlocError(f"results for {variant} have {len(predictions)} predictions but the data have "
                             f"{len(data.test)} test items: pass the run's own data (run.data)")
        correct[variant] = [int(data.is_correct(p, e)) for p, e in zip(predictions, data.test)]
        accuracy = results["variants"][variant]["accuracy"]
        if abs(sum(correct[variant]) / max(len(predictions), 1) - accuracy) > 1e-9:
            raise EmlocError(f"re-scoring the {variant} predictions does not give the saved accuracy "
                             f"{accuracy:.4f}: "
                             f"the data are not the ones the run was evaluated on; pass run.data")
    return correct
