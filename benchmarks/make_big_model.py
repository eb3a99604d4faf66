"""Write a randomly initialised Llama-style model of at least 1.5B parameters as safetensors shards.

For the layer-streaming benchmark (``bench_streaming.py``). Nothing is held whole in memory: the
model is laid out on the meta device and each tensor is drawn (normal, std = initializer_range;
norms = 1), written into ~1 GB shards with a standard ``model.safetensors.index.json``, so
transformers' ``from_pretrained`` reads the folder like any saved model. The default tokenizer is
saved beside it (its vocabulary is the model's).

    python benchmarks/make_big_model.py runs/big-llama      # ~3.1 GB in bfloat16
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from emloc.svd_emulator import count_parameters
from emloc.models import load_tokenizer

BIG_CONFIG = dict(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=30,
                  num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def random_tensor(name: str, shape: torch.Size, std: float, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=generator) * std).to(dtype)


def write_shards(folder: Path, config: LlamaConfig, dtype: torch.dtype, shard_bytes: int, seed: int) -> int:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    shapes = {name: p.shape for name, p in model.state_dict().items()}
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        current[name] = random_tensor(name, shape, config.initializer_range, generator, dtype)
        size += current[name].numel() * current[name].element_size()
        if size >= shard_bytes:
            shards.append(_flush(folder, len(shards), current))
            current, size = {}, 0
    if current:
        shards.append(_flush(folder, len(shards), current))
    total = len(shards)
    weight_map = {}
    for number, (tmp_name, names) in enumerate(shards, start=1):
        final = f"model-{number:05d}-of-{total:05d}.safetensors"
        (folder / tmp_name).rename(folder / final)
        weight_map.update({n: final for n in names})
    total_size = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total_size},
                                                                     "weight_map": weight_map}, indent=2))
    return count_parameters(model)


def _flush(folder: Path, index: int, tensors: dict) -> tuple[str, list[str]]:
    name = f"shard-{index}.tmp.safetensors"
    save_file(tensors, str(folder / name), metadata={"format": "pt"})
    print(f"wrote shard {index + 1} ({len(tensors)} tensors)", flush=True)
    return name, list(tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/big-llama", help="output folder (not in the repository)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--layers", type=int, default=BIG_CONFIG["num_hidden_layers"])
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**{**BIG_CONFIG, "num_hidden_layers": args.layers}, dtype=args.dtype)
    n_params = write_shards(folder, config, getattr(torch, args.dtype), int(args.shard_gb * 2**30), args.seed)
    config.save_pretrained(folder)
    load_tokenizer("default").save_pretrained(folder)
    print(f"{folder}: {n_params / 1e9:.3f}B parameters in {args.dtype}")


if __name__ == "__main__":
    main()
