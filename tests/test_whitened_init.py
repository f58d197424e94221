"""Data-aware (whitened) initialisation: every rank prefix is the best on the calibration
activations, nesting and exactness at full rank hold, fallbacks are reported, facts are recorded."""

from __future__ import annotations

import json

import pytest
import torch

import nsn_export as nsn
from nsn_export.activations import InputMoment, input_moments, layer_groups
from nsn_export.layers import NSNLinear
from tiny import tiny_model


def correlated_inputs(n=4000, d=48, seed=0):
    """Activations with a few dominant directions, as real ones have."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(d, d, generator=generator, dtype=torch.float64)
    scales = torch.logspace(1, -2, d, dtype=torch.float64)
    return torch.randn(n, d, generator=generator, dtype=torch.float64) @ (basis * scales[:, None])


def test_every_prefix_beats_plain_svd_on_the_activations_and_full_rank_is_exact():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40).double()
    x = correlated_inputs()
    moment = InputMoment(x.T @ x, x.shape[0])
    plain = NSNLinear.from_linear(linear, 40)
    whitened = NSNLinear.from_linear(linear, 40, input_moment=moment, damping=1e-8)
    assert plain.init_method == "svd" and whitened.init_method == "whitened"
    w = linear.weight.detach()
    # Near full rank both errors are rounding noise whose size depends on the CPU's BLAS path:
    # compare above a floor scaled to the size of the output, not relative to the noise.
    noise_floor = 1e-9 * torch.linalg.norm(w @ x.T)
    for r in range(1, 41):
        error_plain = torch.linalg.norm((w - plain.weight_at(r)) @ x.T)
        error_whitened = torch.linalg.norm((w - whitened.weight_at(r)) @ x.T)
        assert error_whitened <= error_plain + noise_floor, (r, error_whitened, error_plain)
    assert torch.linalg.norm((w - whitened.weight_at(8)) @ x.T) < 0.5 * torch.linalg.norm((w - plain.weight_at(8)) @ x.T)
    assert torch.allclose(whitened.weight_at(40), w, atol=1e-8)  # exact at min(d_in, d_out)
    assert torch.equal(whitened.weight_at(5), whitened.B[:, :5] @ whitened.A[:5])  # nested prefixes


@pytest.mark.parametrize("moment, reason", [
    (InputMoment(torch.eye(48, dtype=torch.float64) * 10, 10), "10 calibration tokens < 48"),
    (InputMoment(torch.full((48, 48), float("nan"), dtype=torch.float64), 5000), "non-finite"),
])
def test_degenerate_statistics_fall_back_to_plain_svd_and_say_why(moment, reason):
    layer = NSNLinear.from_linear(torch.nn.Linear(48, 40), 16, input_moment=moment)
    assert layer.init_method.startswith("svd (fallback") and reason in layer.init_method


def test_layer_groups_respect_the_memory_budget():
    groups = layer_groups({"a": 100, "b": 100, "c": 300, "d": 50}, memory_bytes=2 * 100 * 100 * 8)
    assert groups == [["a", "b"], ["c"], ["d"]]


def test_adapt_with_calibration_records_the_method_and_survives_checkpoint_and_export(tmp_path):
    from nsn_export.export import export_onnx, read_metadata

    model = tiny_model("llama")
    reference = tiny_model("llama")
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 96, (4, 24), generator=generator),
                "attention_mask": torch.ones(4, 24, dtype=torch.long)} for _ in range(8)]
    from nsn_export.surgery import find_targets

    names = find_targets(reference, "all-linear")
    moments = input_moments(reference, names, batches, max_tokens=10**6, memory_bytes=64 * 64 * 8)
    assert all(m.tokens == 8 * 4 * 24 for m in moments.values())
    report = nsn.adapt(model, "all-linear", max_rank=1.0, calibration=batches, calibration_tokens=400)
    assert {row.init for row in report.layers} == {"whitened"} and "whitened" in report.table()
    assert model.nsn_config.init == "whitened" and model.nsn_config.calibration_tokens == 480  # whole batches
    ids = batches[0]["input_ids"]
    with torch.no_grad():  # full rank: the same model
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4)
    assert not any(module._forward_pre_hooks for module in reference.modules())  # hooks removed
    loaded = nsn.load_nsn(nsn.save_nsn(model, tmp_path / "ckpt"))
    assert loaded.nsn_config.init == "whitened"
    result = export_onnx(loaded, tmp_path / "onnx", verify=False)
    assert json.loads(read_metadata(result.path)["nsn.init"]) == {"method": "whitened", "calibration_tokens": 480}
