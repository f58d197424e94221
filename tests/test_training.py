import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import nsn_export as nsn
from nsn_export.data import TokenizedDataset, collate, english_sentences
from nsn_export.objective import MIN_START_LOSS, distillation_loss
from tiny import tiny_model, tiny_text, tiny_tokenizer


def teacher_task(seed=0, n=2048):
    """Labels from a random teacher network: a small task the student learns in seconds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    w1, w2 = torch.randn(32, 64, generator=g), torch.randn(64, 8, generator=g)
    y = (torch.tanh(x @ w1) @ w2).argmax(-1)
    return x, y


def student(seed=1):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    nsn.adapt(net, ["0", "2"], max_rank=32)
    return net


def classify(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def train(samples_per_step, steps=800, seed=1):
    x, y = teacher_task()
    net = student(seed)
    objective = nsn.MultiRankObjective(32, ranks=[2, 4, 8, 16], samples_per_step=samples_per_step,
                                       schedule="uniform", seed=seed)
    optimizer = torch.optim.Adam(list(net.parameters()) + list(objective.parameters()), lr=3e-3)
    for step in range(steps):
        index = torch.randint(0, len(x), (128,), generator=torch.Generator().manual_seed(step))
        loss, _ = objective(net, classify, (x[index], y[index]), progress=step / steps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net, objective


def loss_at(net, rank_value):
    x, y = teacher_task(seed=0)
    with torch.no_grad(), nsn.rank(net, rank_value):
        return float(classify(net, (x, y))[0])


def test_multi_rank_training_keeps_low_ranks_good_where_anchor_only_training_does_not():
    anchor_only, _ = train(samples_per_step=0)
    multi, objective = train(samples_per_step=2)
    for low in (4, 8, 16):
        assert loss_at(multi, low) < 0.5 * loss_at(anchor_only, low), low
    assert loss_at(multi, 2) < loss_at(anchor_only, 2)
    assert loss_at(multi, 32) < 0.3  # the anchor still learns the task
    # Learned log-variances order with difficulty: lower ranks are harder, so s_k is higher.
    s = objective.learned_log_variances()
    assert s[2] > s[8] > s[32]
    assert sorted(objective.trained_ranks) == [2, 4, 8, 16, 32]


def test_curriculum_opens_ranks_from_high_to_low():
    objective = nsn.MultiRankObjective(64, ranks=[4, 8, 16, 32, 48], schedule="curriculum", warmup_fraction=0.5)
    assert objective.allowed_ranks(0.0) == [48]
    assert objective.allowed_ranks(0.25) == [16, 32, 48]
    assert objective.allowed_ranks(0.5) == objective.allowed_ranks(1.0) == [4, 8, 16, 32, 48]
    assert objective.step_ranks(0.0) == [64, 48]


def test_curriculum_gives_every_rank_the_same_share_of_steps_though_low_ranks_open_late():
    objective = nsn.MultiRankObjective(64, ranks=[2, 4, 8, 16, 32, 48], samples_per_step=2, warmup_fraction=0.5)
    steps = 300
    for step in range(steps):
        objective.step_ranks(step / steps)
    counts = objective.sample_counts
    # one rank is open at the start, then two per step: ~97 each, the lowest opened at half-time
    assert sum(counts.values()) > 2 * steps - 20
    assert max(counts.values()) - min(counts.values()) <= 1, counts


def test_each_s_k_starts_at_the_log_of_its_first_loss_and_is_held_on_that_step():
    objective = nsn.MultiRankObjective(8, ranks=[2, 4], samples_per_step=1, schedule="uniform")
    losses = {8: torch.tensor(0.5, requires_grad=True), 4: torch.tensor(2.0, requires_grad=True)}
    total = objective.combine(losses, held=objective.start_log_variances(losses))
    assert objective.learned_log_variances() == pytest.approx({4: math.log(2.0), 8: math.log(0.5)})
    total.backward()
    assert all(s.grad is None for s in objective.log_variances)  # no Adam step on a rounding error
    # a known rank keeps its learned value; an exact start (loss 0) gets a finite weight
    objective.log_variance(4).data.fill_(-1.0)
    started = objective.start_log_variances({4: torch.tensor(3.0), 2: torch.tensor(0.0)})
    assert started == {2} and objective.learned_log_variances()[4] == -1.0
    assert objective.learned_log_variances()[2] == pytest.approx(math.log(MIN_START_LOSS))


def test_uncertainty_weighting_formula():
    objective = nsn.MultiRankObjective(8, ranks=[2, 4])
    with torch.no_grad():
        for s, value in zip(objective.log_variances, (0.5, -1.0, 2.0)):  # ranks 8, 4, 2
            s.fill_(value)
    losses = {8: torch.tensor(1.0), 2: torch.tensor(3.0)}
    expected = torch.exp(torch.tensor(-0.5)) * 1.0 + 0.5 + torch.exp(torch.tensor(-2.0)) * 3.0 + 2.0
    assert torch.allclose(objective.combine(losses), expected)


def test_distillation_loss_is_kl_to_the_detached_teacher():
    student_logits = torch.randn(2, 5, 11, requires_grad=True)
    teacher_logits = torch.randn(2, 5, 11, requires_grad=True)
    loss = distillation_loss("kl", student_logits, teacher_logits)
    p = F.softmax(teacher_logits, -1)
    expected = (p * (p.log() - F.log_softmax(student_logits, -1))).sum(-1).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert teacher_logits.grad is None
    assert distillation_loss("kl", teacher_logits, teacher_logits) < 1e-6


def test_nsn_trainer_logs_per_rank_losses_and_saves_learned_s_k_and_moves_only_the_sampled_s_k(tmp_path):
    model = tiny_model("llama")
    nsn.adapt(model, "all-linear", max_rank=16)
    tokenizer = tiny_tokenizer()
    records = [{"text": text} for text in tiny_text(16)]
    dataset = TokenizedDataset(records, tokenizer, max_length=16, causal_lm=True)
    objective = nsn.MultiRankObjective(16, samples_per_step=2, distill="kl")
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=4,
                                          logging_steps=2, save_steps=4, report_to=[], learning_rate=1e-2,
                                          use_cpu=True, disable_tqdm=True)
    trainer = nsn.NSNTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate(tokenizer),
                             objective=objective, processing_class=tokenizer)
    start = objective.log_variance_vector()
    snapshots = []

    class Record(transformers.TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            snapshots.append({"s": objective.learned_log_variances(), "counts": dict(objective.sample_counts)})

    trainer.add_callback(Record())
    trainer.train()
    assert not torch.equal(start, objective.log_variance_vector())  # s_k are optimised
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert "loss_rank_16" in logged and "s_rank_16" in logged
    assert any(k.startswith("loss_rank_") and k != "loss_rank_16" for k in logged)
    for before, after in zip(snapshots, snapshots[1:]):
        for rank_value in objective.ranks:  # the anchor is trained at every step
            if after["counts"][rank_value] == before["counts"][rank_value] and rank_value in before["s"]:
                assert after["s"][rank_value] == before["s"][rank_value], (rank_value, snapshots)
    trainer.save_model(str(tmp_path / "out"))
    loaded = nsn.load_nsn(tmp_path / "out")
    assert 16 in loaded.nsn_config.trained_ranks and len(loaded.nsn_config.trained_ranks) >= 2
    assert set(loaded.nsn_config.log_variances) == set(loaded.nsn_config.trained_ranks)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_english_sentences_are_offline_and_deterministic():
    first = english_sentences(50)
    assert first == english_sentences(50) and len(first) == 50
    assert all(s[0].isupper() and len(s.split()) >= 6 for s in first)


def test_hidden_states_forward_returns_every_layer_at_every_real_token_only():
    from nsn_export.outputs import hidden_states_forward

    model = tiny_model("bert")
    tokenizer = tiny_tokenizer()
    batch = collate(tokenizer)([dict(tokenizer(t)) for t in ("w1 w2 w3", "w4 w5 w6 w7 w8")])
    _, states = hidden_states_forward(model, batch)
    assert states.shape == (2, 3 + 5, 32)  # two layers, eight real tokens (two padding ones left out)
    alone = hidden_states_forward(model, collate(tokenizer)([dict(tokenizer("w1 w2 w3"))]))[1]
    torch.testing.assert_close(states[:, :3], alone, atol=1e-5, rtol=1e-5)
