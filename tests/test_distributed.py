"""LoRA on the emulator with 2 CPU processes (torchrun, DDP over gloo) writes a standard peft adapter."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from emloc import pipeline
from emloc.config import RunConfig
from emloc.distributed import launch_command, train_distributed
from emloc.models import load_tokenizer, tiny_llama


def test_two_process_training_writes_a_plain_peft_adapter(tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_llama(seed=0, vocab_size=49152).save_pretrained(model_dir)
    load_tokenizer("default").save_pretrained(model_dir)
    config = RunConfig.from_dict({
        "model": str(model_dir), "device": "cpu",
        "data": {"n_train": 16, "n_calibration": 4, "n_test": 2, "max_length": 64},
        "lora": {"steps": 2, "batch_size": 4, "warmup_steps": 0, "learning_rate": 5e-3, "r": 4},
    })
    run = pipeline.Run(tmp_path / "run", config, progress=False)
    pipeline.build(run, pipeline.calibrate(run))

    assert "--nproc-per-node=2" in launch_command(run.dir, "emulator", 2)
    summary = train_distributed(run.dir, "emulator", num_processes=2, timeout=300)

    assert summary["processes"] == 2 and summary["per_process_batch_size"] == 2
    assert [step for step, _ in summary["history"]] == [1, 2]
    assert run.is_done("train_emulator")
    adapter = run.adapter_dir("emulator")
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    # Plain peft, on the original model (no emloc code): the adapter fits and has been trained (B != 0).
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(original, str(adapter))
    B = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert B.shape == (64, 4) and B.abs().sum() > 0
    # the corrected adapter follows from it as usual
    assert len(pipeline.correct(run)) == 2 * 7
