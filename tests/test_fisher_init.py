"""Two-sided ("fisher") initialisation: each rank prefix is the best in the norm weighted by the
input statistics and the loss's sampled Gauss-Newton matrix at the outputs; the samples have the
right expectation; the gradient statistics are what autograd says; nothing is left on the model."""

from __future__ import annotations

import pytest
import torch

import nsn_export as nsn
from nsn_export.activations import InputMoment, gauss_newton_probe, output_moments
from nsn_export.layers import NSNLinear
from nsn_export.outputs import mean_pool
from nsn_export.surgery import find_targets
from test_whitened_init import correlated_inputs
from tiny import tiny_model


def weighted_error(w, w_r, root_g, x):
    return torch.linalg.norm(root_g @ (w - w_r) @ x.T)


def test_every_prefix_is_best_in_the_output_weighted_norm_and_full_rank_is_exact():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40).double()
    x = correlated_inputs()
    gradients = correlated_inputs(n=3000, d=40, seed=1)
    inputs, outputs = InputMoment(x.T @ x, x.shape[0]), InputMoment(gradients.T @ gradients, gradients.shape[0])
    whitened = NSNLinear.from_linear(linear, 40, input_moment=inputs, damping=1e-8)
    fisher = NSNLinear.from_linear(linear, 40, input_moment=inputs, damping=1e-8, output_moment=outputs,
                                   output_damping=1e-8)
    assert fisher.init_method == "fisher"
    values, vectors = torch.linalg.eigh(outputs.covariance)
    root_g = (vectors * values.sqrt()) @ vectors.T
    w = linear.weight.detach()
    noise_floor = 1e-9 * torch.linalg.norm(root_g @ w @ x.T)  # rounding noise near full rank
    for r in range(1, 41):
        error_fisher = weighted_error(w, fisher.weight_at(r), root_g, x)
        error_whitened = weighted_error(w, whitened.weight_at(r), root_g, x)
        assert error_fisher <= error_whitened + noise_floor, (r, error_fisher, error_whitened)
    assert weighted_error(w, fisher.weight_at(8), root_g, x) < 0.7 * weighted_error(w, whitened.weight_at(8), root_g, x)
    assert torch.allclose(fisher.weight_at(40), w, atol=1e-8)  # exact at min(d_in, d_out)
    assert torch.equal(fisher.weight_at(5), fisher.B[:, :5] @ fisher.A[:5])  # nested prefixes


def test_data_aware_factors_are_balanced_like_plain_svds():
    """Whitening and output weighting leave one factor far larger than the other; Adam, moving every
    weight by about the learning rate, then wrecks the smaller one (the full rank of MiniLM fell to
    cosine 0.88 within 300 steps). Each component's row of A and column of B have the same norm."""
    x = correlated_inputs()
    gradients = 1e-3 * correlated_inputs(n=3000, d=40, seed=1)  # gradients are small numbers
    linear = torch.nn.Linear(48, 40).double()
    inputs, outputs = InputMoment(x.T @ x, x.shape[0]), InputMoment(gradients.T @ gradients, gradients.shape[0])
    for layer in (NSNLinear.from_linear(linear, 40, input_moment=inputs),
                  NSNLinear.from_linear(linear, 40, input_moment=inputs, output_moment=outputs)):
        a_norms, b_norms = layer.A.detach().norm(dim=1), layer.B.detach().norm(dim=0)
        assert torch.allclose(a_norms, b_norms, rtol=1e-6), layer.init_method
        assert torch.allclose(layer.weight_at(40), linear.weight, atol=1e-8)


@pytest.mark.parametrize("moment, reason", [
    (InputMoment(torch.zeros(40, 40, dtype=torch.float64), 5000), "zero output gradients"),
    (InputMoment(torch.full((40, 40), float("inf"), dtype=torch.float64), 5000), "non-finite"),
])
def test_unusable_output_statistics_keep_the_whitened_start_and_say_why(moment, reason):
    x = correlated_inputs()
    layer = NSNLinear.from_linear(torch.nn.Linear(48, 40), 16, input_moment=InputMoment(x.T @ x, x.shape[0]),
                                  output_moment=moment)
    assert layer.init_method.startswith("whitened (fisher skipped") and reason in layer.init_method


def test_the_probes_have_the_gauss_newton_matrix_as_their_second_moment():
    generator = torch.Generator().manual_seed(0)
    samples = 40000
    # cosine distillation of an embedding e: E[v v^T] = (I - e e^T / |e|^2) / |e|^2
    e = torch.tensor([3.0, -1.0, 2.0, 0.5])
    v = gauss_newton_probe(e.expand(samples, 4), False, generator)
    unit = e / e.norm()
    expected = (torch.eye(4) - torch.outer(unit, unit)) / e.norm() ** 2
    assert torch.allclose(v.T @ v / samples, expected, atol=0.05 * float(expected.abs().max()))
    # KL distillation of logits: E[v v^T] = diag(p) - p p^T, zero at padded tokens
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    v = gauss_newton_probe(logits.expand(1, samples, 4), True, generator)[0]
    p = logits.softmax(-1)
    assert torch.allclose(v.T @ v / samples, torch.diag(p) - torch.outer(p, p), atol=0.01)
    mask = torch.tensor([[1, 1, 0]])
    v = gauss_newton_probe(torch.randn(1, 3, 4), True, generator, mask)
    assert torch.equal(v[0, 2], torch.zeros(4)) and v[0, :2].abs().sum() > 0


def test_output_moments_are_autograds_gradients_at_real_tokens_and_leave_the_model_as_it_was():
    model = tiny_model("bert")
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0  # padding is not a token
    batch = {"input_ids": torch.randint(0, 96, (3, 10), generator=generator), "attention_mask": mask}
    names = find_targets(model, "all-linear")
    moments = output_moments(model, names, [batch], max_tokens=10**6, memory_bytes=64 * 64 * 8, seed=7)
    assert all(m.tokens == int(mask.sum()) for m in moments.values())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # as it was
    assert not any(module._forward_hooks for module in model.modules())

    name = names[-1]  # recompute one layer's statistics by hand, with the same draws
    captured = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, output: captured.update(y=output))
    outputs = model(**batch)
    handle.remove()
    embedding = mean_pool(outputs.last_hidden_state, mask)
    probe = gauss_newton_probe(embedding, False, torch.Generator().manual_seed(7))
    (grad,) = torch.autograd.grad((embedding * probe).sum(), captured["y"])
    g = grad[mask.bool()].double()
    assert torch.allclose(moments[name].xtx, g.T @ g, rtol=1e-4, atol=1e-12 * float((g.T @ g).abs().max()))
    model.zero_grad(set_to_none=True)


def test_adapt_with_fisher_on_a_decoder_records_the_method_and_is_exact_at_full_rank():
    model, reference = tiny_model("llama"), tiny_model("llama")
    generator = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(0, 96, (4, 24), generator=generator),
                "attention_mask": torch.ones(4, 24, dtype=torch.long)} for _ in range(8)]
    seen = []
    report = nsn.adapt(model, "all-linear", 1.0, calibration=batches, calibration_tokens=400, fisher=True,
                       fisher_progress=lambda done, total: seen.append((done, total)))
    assert {row.init for row in report.layers} == {"fisher"} and model.nsn_config.init == "fisher"
    assert seen and seen[-1][0] == seen[-1][1]
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_fisher_without_calibration_data_is_refused():
    with pytest.raises(ValueError, match="pass calibration batches"):
        nsn.adapt(tiny_model("llama"), "all-linear", 1.0, fisher=True)
