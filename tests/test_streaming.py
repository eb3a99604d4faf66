"""Layer-streamed construction equals the in-memory one (calibration statistics and factors)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from emloc import io, pipeline, streaming
from emloc.config import RunConfig, merge_dicts
from emloc.errors import EmlocError
from emloc.models import load_tokenizer, tiny_llama, torch_threads


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny decompositions: one thread avoids oversubscribing a busy 2-core machine."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def sharded_model_dir(tmp_path_factory):
    """A tiny 3-layer Llama saved as several safetensors shards with an index, plus a tokenizer."""
    folder = tmp_path_factory.mktemp("sharded-llama")
    tiny_llama(seed=3, num_layers=3, hidden_size=64, intermediate_size=160).save_pretrained(folder, max_shard_size="3MB")
    load_tokenizer("default").save_pretrained(folder)
    assert len(list(folder.glob("model-*.safetensors"))) >= 2
    return folder


def _config(model_dir, **emulator):
    base = {"model": str(model_dir), "device": "cpu",
            "data": {"n_train": 24, "n_calibration": 11, "n_test": 4, "max_length": 80},
            "emulator": {"ratio": 0.4, **emulator}}
    return RunConfig.from_dict(merge_dicts({}, base))


@pytest.mark.parametrize("emulator", [
    {"ratio_patterns": {r".*mlp\..*": 0.6}},
    {"method": "plain", "compute_dtype": "float32", "target_modules": ["q_proj", "v_proj", "down_proj"]},
])
def test_streamed_equals_in_memory(sharded_model_dir, tmp_path, emulator):
    memory = pipeline.Run(tmp_path / "memory", _config(sharded_model_dir, **emulator), progress=False)
    stats = pipeline.calibrate(memory)
    factors = pipeline.build(memory, stats)

    streamed_run = pipeline.Run(tmp_path / "streamed", _config(sharded_model_dir, **emulator), progress=False)
    result = streaming.stream_build(streamed_run, keep_statistics=True)
    assert result.layers == 3
    streamed_stats, streamed = streamed_run.stats(), streamed_run.factors()

    assert streamed_stats.input_of == stats.input_of
    assert streamed_stats.token_counts == stats.token_counts
    assert len(set(stats.input_of.values())) < len(stats.input_of) or len(stats.input_of) == 3
    for name, C in stats.covariances.items():
        torch.testing.assert_close(streamed_stats.covariances[name], C, rtol=1e-6, atol=1e-6)
    assert list(streamed.u) == list(factors.u)
    for name in factors.u:
        torch.testing.assert_close(streamed.W_emulated(name), factors.W_emulated(name), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(streamed.spectra[name]["whitened"], factors.spectra[name]["whitened"])
    assert streamed.report[["module", "rank", "ratio"]].equals(factors.report[["module", "rank", "ratio"]])
    torch.testing.assert_close(streamed.report["calibration_error"], factors.report["calibration_error"], check_dtype=False)
    assert io.read_json(streamed_run.manifest_path("build"))["params_emulator"] == \
        io.read_json(memory.manifest_path("build"))["params_emulator"]


def test_streamed_run_feeds_the_pipeline(sharded_model_dir, tmp_path):
    """The streamed artifacts load as an emulator whose logits match the in-memory emulator's."""
    config = _config(sharded_model_dir)
    memory = pipeline.Run(tmp_path / "memory", config, progress=False)
    pipeline.build(memory, pipeline.calibrate(memory))
    streamed = pipeline.Run(tmp_path / "streamed", config, progress=False)
    result = streaming.stream_build(streamed)
    assert result.stats is None and not streamed.is_done("calibrate") and streamed.is_done("build")
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(streamed.emulator()(input_ids=ids).logits, memory.emulator()(input_ids=ids).logits)


def test_streaming_only_factors_decoder_layers(sharded_model_dir, tmp_path):
    run = pipeline.Run(tmp_path / "run", _config(sharded_model_dir, target_modules=["q_proj", "lm_head"]), progress=False)
    with pytest.raises(EmlocError, match="outside the decoder layers"):
        streaming.stream_build(run)


def test_shard_reader_names_a_missing_tensor(sharded_model_dir):
    reader = streaming.ShardReader(sharded_model_dir)
    assert len(set(reader.shard_of.values())) >= 2
    with pytest.raises(EmlocError, match="no tensor model.layers.9"):
        reader.load(["model.layers.9.mlp.up_proj.weight"], torch.float32)
    with pytest.raises(EmlocError, match="no safetensors weights"):
        streaming.ShardReader(sharded_model_dir.parent)


def test_concat_safetensors_round_trip(tmp_path):
    parts = {"a": {"x.u": torch.randn(3, 5), "x.v": torch.randn(2, 7).to(torch.bfloat16)},
             "b": {"y.u": torch.randn(11), "y.v": torch.arange(5)}}
    for name, tensors in parts.items():
        io.write_tensors(tmp_path / f"{name}.safetensors", tensors)
    io.concat_safetensors([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "joined.safetensors",
                          chunk_bytes=7)
    joined = io.read_tensors(tmp_path / "joined.safetensors")
    expected = parts["a"] | parts["b"]
    assert sorted(joined) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(joined[key], tensor)
    with pytest.raises(EmlocError, match="appears in two parts"):
        io.concat_safetensors([tmp_path / "a.safetensors", tmp_path / "a.safetensors"], tmp_path / "bad.safetensors")


def test_cli_build_stream(sharded_model_dir, tmp_path):
    from emloc.cli import main
    out = tmp_path / "cli-run"
    assert main(["build", "--stream", "--out", str(out), "--model", str(sharded_model_dir), "--preset", "quick",
                 "--device", "cpu", "--ratio", "0.3"]) == 0
    run = pipeline.Run(out, progress=False)
    assert run.is_done("build") and set(run.factors().report["ratio"]) == {0.3}
