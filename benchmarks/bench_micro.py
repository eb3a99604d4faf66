"""Micro-benchmarks behind figures that benchmarks/README.md quotes in prose, so each has a file:

    python benchmarks/bench_micro.py

1. ``linear``: one linear layer's forward and backward (480 tokens x 2048 -> 2048, gradients for the input and
   the weight) in float32 and bfloat16: GFLOPS, median of 7 after 2 warm-ups. Whether bfloat16 pays depends
   on the CPU (``cpu_bf16`` says what torch reports).
2. ``output_layer``: the default model's output layer (49152 x 576) on a 30-position loss window at batch 8,
   given as transformers gives it (a strided view of the hidden states) and as a contiguous copy
   (:func:`emloc.models.contiguous_output_layer_input`): forward + backward seconds in float32; and, for the
   1.5B model's 49152 x 2048 output layer in bfloat16, the transient memory of the forward (peak RSS above the
   RSS before the call).
3. ``saved_tensors``: activation bytes the default model and its emulator (ratio 0.5, random factors of the
   right rank: the bytes do not depend on the values) save for backward in one LoRA step (batch 8 x 60 tokens,
   loss on the last 30), with activation checkpointing off and on, counted with
   ``torch.autograd.graph.saved_tensors_hooks`` (each storage once; the frozen weights autograd also holds are
   resident anyway and left out).

One torch thread. Writes ``benchmarks/results/micro.json`` and ``micro.md`` (the table the README quotes) with
their provenance record.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 2 ** 20


def median_seconds(step, repeats: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def linear_gflops(dtype, tokens: int = 480, features: int = 2048) -> float:
    import torch
    x = torch.randn(tokens, features, dtype=dtype, requires_grad=True)
    layer = torch.nn.Linear(features, features, bias=False).to(dtype)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).sum().backward()
    return 3 * 2 * tokens * features * features / median_seconds(step) / 1e9


def output_layer_seconds(contiguous: bool, hidden_size: int = 576, vocab: int = 49152) -> float:
    import torch
    hidden = torch.randn(8, 60, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size) * 0.02

    def step():
        hidden.grad = None
        window = hidden[:, -30:, :]
        window = window.contiguous() if contiguous else window
        torch.nn.functional.linear(window, weight).sum().backward()
    return median_seconds(step, repeats=5)


def _rss(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) * 1024.0


def output_layer_transient_mb(contiguous: bool, hidden_size: int = 2048, vocab: int = 49152) -> float:
    """Peak RSS above the RSS before one bfloat16 forward of the output layer (Linux ``clear_refs``)."""
    import torch
    hidden = torch.randn(8, 60, hidden_size, dtype=torch.bfloat16)
    weight = torch.randn(vocab, hidden_size, dtype=torch.bfloat16) * 0.02
    window = hidden[:, -30:, :]
    window = window.contiguous() if contiguous else window
    with torch.no_grad():
        Path("/proc/self/clear_refs").write_text("5", encoding="utf-8")
        before = _rss("VmRSS")
        logits = torch.nn.functional.linear(window, weight)
        peak = _rss("VmHWM")
    del logits
    return (peak - before) / MB


def saved_bytes(model, batch, checkpointing: bool) -> float:
    """MB of activations the model's LoRA step saves for backward (each storage counted once; the model's own
    parameters, which autograd also holds on to, are resident anyway and not counted)."""
    import torch
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), [0]

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in seen and key[0] not in weights:
            seen.add(key)
            total[0] += tensor.untyped_storage().nbytes()
        return tensor
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total[0] / MB


def saved_tensors() -> dict:
    import torch

    from emloc.config import EmulatorConfig, LoraConfigSpec
    from emloc.families import last_block_output, linear_shape
    from emloc.calibration import target_linears
    from emloc.lora import add_lora
    from emloc.lowrank import rank_from_ratio
    from emloc.models import load_model
    from emloc.svd_emulator import EmulatorFactors, emulate
    from emloc.targets import excluded_modules

    torch.manual_seed(0)
    ids = torch.randint(3, 40000, (8, 60))
    labels = ids[:, -31:].clone()  # the suite's response window: labels cut to the logits kept
    labels[:, 0] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "logits_to_keep": 31}
    original = load_model("default")
    linears = target_linears(original, ["auto"])
    for name in excluded_modules(linears, EmulatorConfig(), last_block_output(original)):
        del linears[name]
    u, v = {}, {}
    for name, linear in linears.items():
        out_features, in_features = linear_shape(linear)
        r = rank_from_ratio(0.5, out_features, in_features)
        u[name], v[name] = torch.randn(out_features, r) * 0.02, torch.randn(r, in_features) * 0.02
    emulator = emulate(original, EmulatorFactors(u, v, {}, None, "activation_aware"))
    result = {}
    for label, model in (("original", original), ("emulator", emulator)):
        peft_model = add_lora(model, LoraConfigSpec(), ["auto"], seed=0)
        for checkpointing in (False, True):
            key = f"{label}_{'checkpointing' if checkpointing else 'no_checkpointing'}_mb"
            result[key] = saved_bytes(peft_model, batch, checkpointing)
    return result


def main(argv: list[str]) -> int:
    import pandas as pd
    import torch

    from emloc import io, provenance
    from emloc.precision import cpu_bf16_features

    torch.set_num_threads(1)
    result = {
        "threads": 1, "cpu_bf16": cpu_bf16_features(),
        "linear_gflops_float32": linear_gflops(torch.float32),
        "linear_gflops_bfloat16": linear_gflops(torch.bfloat16),
        "output_layer_strided_s": output_layer_seconds(contiguous=False),
        "output_layer_contiguous_s": output_layer_seconds(contiguous=True),
        "output_layer_bf16_transient_strided_mb": output_layer_transient_mb(contiguous=False),
        "output_layer_bf16_transient_contiguous_mb": output_layer_transient_mb(contiguous=True),
        **saved_tensors(),
    }
    rows = [
        ("one linear, forward + backward (480 x 2048 -> 2048), GFLOPS", "float32 / bfloat16",
         result["linear_gflops_float32"], result["linear_gflops_bfloat16"]),
        ("output layer 49152 x 576, 30-position window, fwd + bwd (s, float32)", "strided / contiguous",
         result["output_layer_strided_s"], result["output_layer_contiguous_s"]),
        ("output layer 49152 x 2048, bfloat16 forward, transient (MB)", "strided / contiguous",
         result["output_layer_bf16_transient_strided_mb"], result["output_layer_bf16_transient_contiguous_mb"]),
        ("activations saved for backward, default model (MB)", "checkpointing off / on",
         result["original_no_checkpointing_mb"], result["original_checkpointing_mb"]),
        ("activations saved for backward, its emulator at ratio 0.5 (MB)", "checkpointing off / on",
         result["emulator_no_checkpointing_mb"], result["emulator_checkpointing_mb"]),
    ]
    table = pd.DataFrame(rows, columns=["measurement", "compared", "first", "second"])
    table[["first", "second"]] = table[["first", "second"]].map(lambda x: f"{x:.3g}" if x < 100 else f"{x:.0f}")
    text = table.to_markdown(index=False)
    print(text)
    print("CPU bfloat16 features:", ", ".join(result["cpu_bf16"]) or "none")
    target = ROOT / "benchmarks" / "results" / "micro.json"
    io.write_json(target, result)
    target.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
    record = provenance.record({}, command="python benchmarks/bench_micro.py")
    provenance.write([target, target.with_suffix(".md")], record)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
