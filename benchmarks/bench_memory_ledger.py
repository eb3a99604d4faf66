"""Analytic memory ledger (GiB) for the default model and 8B / 26B / 38B paper-like configs (meta device).

Written twice: without activation checkpointing (``memory_ledger.*``) and with it, the training default
(``memory_ledger_checkpointed.*``).

    python benchmarks/bench_memory_ledger.py [--out benchmarks/results]
"""
import argparse
import dataclasses
from pathlib import Path

from emloc.memory import VISION_PARAMS, LedgerSettings, ledgers

SETTINGS = {
    "default": LedgerSettings(batch_size=8, seq_len=96, dtype="float32"),
    "llama3-8b": LedgerSettings(batch_size=1, seq_len=1024),
    "internvl2-26b-llm": LedgerSettings(batch_size=1, seq_len=1024, extra_frozen_params=VISION_PARAMS["internvl2-26b-llm"]),
    "internvl2-38b-llm": LedgerSettings(batch_size=1, seq_len=1024, extra_frozen_params=VISION_PARAMS["internvl2-38b-llm"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("settings:", {k: (s.batch_size, s.seq_len, s.dtype, s.ratio) for k, s in SETTINGS.items()})
    for suffix, checkpointing in (("", False), ("_checkpointed", True)):
        settings = {k: dataclasses.replace(s, gradient_checkpointing=checkpointing) for k, s in SETTINGS.items()}
        table = ledgers(list(settings), settings)
        table.to_csv(out / f"memory_ledger{suffix}.csv", index=False)
        (out / f"memory_ledger{suffix}.md").write_text(table.to_markdown(index=False, floatfmt=".2f") + "\n", encoding="utf-8")
        print(f"\ngradient checkpointing {'on' if checkpointing else 'off'}")
        print(table.to_string(float_format=lambda x: f"{x:.2f}"))
        for model, rows in table.groupby("model", sort=False):
            totals = rows.set_index("stage")["total"]
            print(f"{model}: LoRA(emulator) / inference(original) = {totals['LoRA (emulator)'] / totals['inference (original)']:.2f}")

if __name__ == "__main__":
    main()
