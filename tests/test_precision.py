"""The CPU-runnable half of the mixed-precision logic, on every CPU: --amp resolves to an explicit type, bf16
autocast trains (natively or emulated), and the fp16 GradScaler skips an overflowing step and lowers its scale."""

import pytest
import torch

import engine
from conftest import loop_config

CPU = torch.device("cpu")


def test_amp_flag_resolves_to_an_explicit_type():
    assert engine.resolve_amp(None, CPU) == "fp32"
    assert engine.resolve_amp("auto", CPU) == "bf16"  # any x86 CPU runs bf16 autocast, natively or emulated
    assert engine.resolve_amp("fp16", CPU) == "fp16"
    with engine.autocast(CPU, "bf16"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with engine.autocast(CPU, "fp32"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


def test_fp16_grad_scaler_skips_an_overflowing_step_on_cpu():
    """A finite loss whose scaled gradients overflow (fp16's everyday failure): the scaler skips the step, halves its
    scale, and the run goes on; the next step trains."""
    weight = torch.nn.Parameter(torch.ones(1))
    net = torch.nn.ParameterList([weight])
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=1000)
    factors = iter([1e35, 1.0])  # 1e35 x 65536 overflows fp32 in the backward; 1.0 does not

    def compute_loss(net, batch):
        loss = weight.sum() * next(factors)
        return loss, {"loss_term": loss}
    batches = [{"image": torch.zeros(2, 1), "mask": torch.zeros(2, 1)} for _ in range(2)]
    progress = engine.EpochProgress(0)
    engine.train_one_epoch(net, compute_loss, batches[:1], optimizer, scaler, progress, loop_config(precision="fp16"))
    assert weight.item() == 1.0 and scaler.get_scale() == 2.0 ** 15  # skipped, scale backed off
    engine.train_one_epoch(net, compute_loss, batches[1:], optimizer, scaler, progress, loop_config(precision="fp16"))
    assert weight.item() == pytest.approx(0.9)  # unscaled gradient 1.0, lr 0.1
