import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nsn_export as nsn
from nsn_export.checkpoint import CheckpointError
from tiny import tiny_model


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_model("llama")
    nsn.adapt(model, "all-linear", max_rank=0.5)
    model.nsn_config.trained_ranks = [4, 16]
    model.nsn_config.log_variances = {4: 0.7, 16: -0.2}
    return model, nsn.save_nsn(model, tmp_path / "ckpt")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "gpt_neox"])
def test_save_then_load_is_bit_exact(tmp_path, arch):
    model = tiny_model(arch)
    nsn.adapt(model, "all-linear", max_rank=0.75)
    loaded = nsn.load_nsn(nsn.save_nsn(model, tmp_path / arch))
    expected, actual = model.state_dict(), loaded.state_dict()
    assert list(expected) == list(actual)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert loaded.nsn_config.layer_ranks == model.nsn_config.layer_ranks


def test_nsn_config_round_trips(checkpoint):
    _, path = checkpoint
    config = nsn.load_nsn(path).nsn_config
    assert config.trained_ranks == [4, 16] and config.log_variances == {4: 0.7, 16: -0.2}
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "nsn_config.json", "nsn_output.json"]


def test_a_checkpoint_and_an_export_go_into_an_existing_empty_directory(tmp_path):
    """The everyday ``with tempfile.TemporaryDirectory() as d: save_nsn(model, d)``: an empty
    directory holds nothing to lose, so it is accepted, and the swap leaves it whole."""
    import tempfile

    from nsn_export.export import export_onnx

    model = tiny_model("llama")
    nsn.adapt(model, "all-linear", max_rank=0.5)
    with tempfile.TemporaryDirectory(dir=tmp_path) as directory:
        loaded = nsn.load_nsn(nsn.save_nsn(model, directory))
        assert torch.equal(loaded.state_dict()["model.layers.0.mlp.up_proj.A"],
                           model.state_dict()["model.layers.0.mlp.up_proj.A"])
        with tempfile.TemporaryDirectory(dir=tmp_path) as onnx_dir:
            result = export_onnx(loaded, onnx_dir, overwrite=False)  # verified before it lands
            assert result.path.parent.samefile(onnx_dir) and (result.path.parent / "nsn_output.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing left beside it


@pytest.mark.parametrize("name", ["config.json", "nsn_config.json", "model.safetensors"])
def test_missing_file_is_named(checkpoint, name):
    _, path = checkpoint
    (path / name).unlink()
    with pytest.raises(CheckpointError, match=name):
        nsn.load_nsn(path)


def test_truncated_weights_are_reported_as_corrupt(checkpoint):
    _, path = checkpoint
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        nsn.load_nsn(path)


def test_missing_tensor_is_named_and_nothing_is_reinitialised(checkpoint):
    _, path = checkpoint
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.A"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.A.*missing"):
        nsn.load_nsn(path)


def test_misshaped_tensor_is_named_with_both_shapes(checkpoint):
    _, path = checkpoint
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.B"] = torch.zeros(32, 3)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"q_proj\.B.*\(32, 3\).*\(32, 16\)"):
        nsn.load_nsn(path)


def test_unknown_format_version_is_refused(checkpoint):
    _, path = checkpoint
    config = json.loads((path / "nsn_config.json").read_text())
    config["format_version"] = 99
    (path / "nsn_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format_version 99"):
        nsn.load_nsn(path)


def test_corrupt_json_is_named(checkpoint):
    _, path = checkpoint
    (path / "nsn_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="nsn_config.json: not valid JSON"):
        nsn.load_nsn(path)


def test_failed_save_leaves_the_previous_checkpoint_intact(checkpoint, monkeypatch):
    model, path = checkpoint
    before = (path / "model.safetensors").read_bytes()

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("nsn_export.checkpoint.save_file", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        nsn.save_nsn(model, path)
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]


def test_saved_checkpoint_has_the_users_default_permissions(checkpoint):
    import os
    import stat

    _, path = checkpoint
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((path / "model.safetensors").stat().st_mode) == 0o666 & ~mask
