import copy
import io
import json

import pytest
import torch

from smallgpt.config import OptimConfig, load_config
from smallgpt.errors import UserError
from smallgpt.model.gpt import GPT, ModelConfig
from smallgpt.train.optim import CombinedOptimizer, SophiaG, build_optimizer, hidden_matrices
from smallgpt.train.run import train

OPTIMIZERS = ["adamw", "sophiag", "muon"]


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16))


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(16, (4, 9), generator=torch.Generator().manual_seed(0))
    return tokens[:, :-1], tokens[:, 1:]


def step(model, optimizer, x, y) -> float:
    loss = model(x, y)[1]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def feed_hessian(model, optimizer, x, y) -> None:
    """Squared gradients as a stand-in Hessian, so SophiaG's preconditioned path is exercised."""
    model(x, y)[1].backward()
    optimizer.update_hessian(tokens=x.numel())
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_fits_a_fixed_batch(name):
    model, (x, y) = tiny_model(), fixed_batch()
    optimizer = build_optimizer(model, OptimConfig(optimizer=name, learning_rate=3e-3), "cpu")
    losses = []
    for i in range(40):
        losses.append(step(model, optimizer, x, y))
        if name == "sophiag" and i % 5 == 4:
            feed_hessian(model, optimizer, x, y)
    assert losses[-1] < 0.7 * losses[0]  # ~2.8 (uniform over 16) falls well below


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip_continues_identically(name):
    model, (x, y) = tiny_model(), fixed_batch()
    config = OptimConfig(optimizer=name, learning_rate=3e-3)
    optimizer = build_optimizer(model, config, "cpu")
    for _ in range(3):
        step(model, optimizer, x, y)
    if name == "sophiag":
        feed_hessian(model, optimizer, x, y)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)  # checkpoints load with weights_only=True
    buffer.seek(0)
    clone = copy.deepcopy(model)
    restored = build_optimizer(clone, config, "cpu")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(2):
        step(model, optimizer, x, y)
        step(clone, restored, x, y)
    for p, q in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_model()
    optimizer = build_optimizer(model, OptimConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.02), "cpu")
    assert isinstance(optimizer, CombinedOptimizer)
    muon = {id(p) for g in optimizer.optimizers["muon"].param_groups for p in g["params"]}
    adamw = {id(p) for g in optimizer.optimizers["adamw"].param_groups for p in g["params"]}
    blocks = {id(p) for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert muon == blocks == {id(p) for p in hidden_matrices(model)}
    assert id(model.lm_head.weight) in adamw and not muon & adamw
    assert muon | adamw == {id(p) for p in model.parameters()}
    # the trainer sets lr * lr_scale: Muon's matrices follow the schedule at muon_lr's scale
    (muon_group,) = optimizer.optimizers["muon"].param_groups
    assert muon_group["lr_scale"] * 1e-3 == pytest.approx(0.02)


def test_sophiag_rejects_bad_settings():
    with pytest.raises(UserError, match="hessian_interval"):
        SophiaG(tiny_model().parameters(), hessian_interval=0)


def test_trainer_estimates_the_hessian_exactly_every_k_steps(char_data, tmp_path, monkeypatch):
    calls: list[str] = []
    original_step, original_update = SophiaG.step, SophiaG.update_hessian

    def spy_step(self, closure=None):
        calls.append("step")
        return original_step(self, closure)

    def spy_update(self, tokens, grad_scale=1.0):
        calls.append(f"hessian {tokens}")
        original_update(self, tokens, grad_scale)

    monkeypatch.setattr(SophiaG, "step", spy_step)
    monkeypatch.setattr(SophiaG, "update_hessian", spy_update)
    config = load_config(
        None,
        [
            f"--dataset={char_data}",
            f"--out_dir={tmp_path}",
            "--optimizer=sophiag",
            "--hessian_interval=3",
            *"--max_iters=10 --block_size=16 --n_layer=1 --n_head=2 --n_embd=16 --batch_size=2".split(),
            *"--eval_iters=1 --eval_interval=100 --log_interval=1 --progress=false --device=cpu".split(),
        ],
    )
    train(config)
    hessian = "hessian 32"  # batch 2 x block 16 tokens
    assert calls == 3 * ["step", "step", "step", hessian] + ["step"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    win_rates = [r["win_rate"] for r in records if r["event"] == "train"]
    assert len(win_rates) == 10 and all(0 <= w <= 1 for w in win_rates)
    assert win_rates[-1] > 0  # the Hessian estimate un-clips some coordinates
