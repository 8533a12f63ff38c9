"""CWD and DIST: each loss against an independent float64 loop, the properties that matter (zero when student ==
teacher, growth with the difference, 255 pixels ignored), gradients only into the student, and DIST's per-process
intra-class term under DistributedDataParallel."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import train_cwd
import train_dist
from conftest import REPO


def softmax64(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def cwd_loop(s, t, tau, valid=None):
    """Channel-wise distillation written out: per (n, c) spatial softmax over the kept positions, KL(t || s)."""
    n, c, h, w = s.shape
    total = 0.0
    for i in range(n):
        keep = np.ones((h, w), bool) if valid is None else valid[i].numpy()
        for k in range(c):
            ps = softmax64(s[i, k].double().numpy()[keep] / tau)
            pt = softmax64(t[i, k].double().numpy()[keep] / tau)
            total += float(np.sum(pt * (np.log(pt) - np.log(ps))))
    return total / (n * c) * tau ** 2


def test_cwd_loss_against_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g) * 2
    for tau in (1.0, 4.0):
        assert train_cwd.cwd_loss(s, t, tau).item() == pytest.approx(cwd_loop(s, t, tau), rel=1e-5)
    valid = torch.rand(2, 5, 4, generator=g) > 0.3
    assert train_cwd.cwd_loss(s, t, 4.0, valid).item() == pytest.approx(cwd_loop(s, t, 4.0, valid), rel=1e-5)
    # left-out positions change nothing, and send no gradient (nor NaN) into the student
    s_other = s.clone()
    s_other[~valid.unsqueeze(1).expand_as(s)] = 50.0
    s_other.requires_grad_(True)
    loss = train_cwd.cwd_loss(s_other, t, 4.0, valid)
    assert loss.item() == pytest.approx(cwd_loop(s, t, 4.0, valid), rel=1e-5)
    loss.backward()
    grad = s_other.grad
    assert torch.isfinite(grad).all() and (grad[~valid.unsqueeze(1).expand_as(s)] == 0).all()


def test_cwd_is_zero_for_equal_maps_and_grows_with_the_difference():
    g = torch.Generator().manual_seed(1)
    t, d = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    assert train_cwd.cwd_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    losses = [train_cwd.cwd_loss(t + a * d, t, 4.0).item() for a in (0.25, 0.5, 1.0, 2.0)]
    assert all(0 < a < b for a, b in zip(losses, losses[1:]))
    # a constant added to a whole channel map leaves its spatial distribution unchanged: no loss
    assert train_cwd.cwd_loss(t + 3.0, t, 4.0).item() == pytest.approx(0.0, abs=1e-6)


def dist_loop(s, t, target, tau):
    """DIST written out: probabilities at each kept pixel, correlations by numpy's corrcoef."""
    ps, pt = [], []
    n, _, h, w = s.shape
    for i in range(n):
        for y in range(h):
            for x in range(w):
                if target[i, y, x] != 255:
                    ps.append(softmax64(s[i, :, y, x].double().numpy() / tau))
                    pt.append(softmax64(t[i, :, y, x].double().numpy() / tau))
    ps, pt = np.array(ps), np.array(pt)
    inter = 1 - np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(ps, pt)])
    intra = 1 - np.mean([np.corrcoef(ps[:, k], pt[:, k])[0, 1] for k in range(ps.shape[1])])
    return inter, intra


def test_dist_loss_against_a_float64_loop_and_ignore_pixels():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 5, 4, 3, generator=g), torch.randn(2, 5, 4, 3, generator=g) * 2
    target = torch.randint(0, 5, (2, 4, 3), generator=g)
    target[0, 1] = 255
    target[1, 2, 2] = 255
    for tau, beta, gamma in ((1.0, 1.0, 1.0), (2.0, 0.5, 3.0)):
        inter, intra = dist_loop(s, t, target, tau)
        got_inter, got_intra = train_dist.dist_terms(s, t, target, tau)
        assert got_inter.item() == pytest.approx(inter, rel=1e-5) and got_intra.item() == pytest.approx(intra, rel=1e-5)
        expected = tau ** 2 * (beta * inter + gamma * intra)
        assert train_dist.dist_loss(s, t, target, tau, beta, gamma).item() == pytest.approx(expected, rel=1e-5)
    # 255 pixels are left out: any logits there give the same loss
    s_other, t_other = s.clone(), t.clone()
    ignored = (target == 255).unsqueeze(1).expand_as(s)
    s_other[ignored], t_other[ignored] = 30.0, -30.0
    assert train_dist.dist_loss(s_other, t_other, target, 1.0, 1.0, 1.0).item() == pytest.approx(
        train_dist.dist_loss(s, t, target, 1.0, 1.0, 1.0).item(), rel=1e-6)
    # equal logits: both terms 0; nothing to compare: 0, not NaN
    inter, intra = train_dist.dist_terms(t, t, target, 1.0)
    assert inter.item() == pytest.approx(0.0, abs=1e-6) and intra.item() == pytest.approx(0.0, abs=1e-6)
    assert train_dist.dist_loss(s, t, torch.full_like(target, 255), 1.0, 1.0, 1.0).item() == 0.0


@pytest.mark.parametrize("module", [train_cwd, train_dist])
def test_gradients_reach_the_student_only(module):
    """One step of the script's compute_loss with a live frozen teacher: the student has gradients, the teacher none."""
    torch.manual_seed(0)
    teacher = common.build_teacher(21, pretrained=False).eval().requires_grad_(False)  # as build_frozen_teacher
    student = common.build_student(21, pretrained=False)
    image = torch.randn(2, 3, 32, 32)
    batch = {"image": image, "mask": torch.randint(0, 21, (2, 32, 32)),
             "grid": torch.stack([common.sample_grid(32, 32, 32)] * 2)}
    criterion = torch.nn.CrossEntropyLoss(ignore_index=255)
    if module is train_cwd:
        compute_loss = module.make_compute_loss(criterion, teacher, "fp32", 4.0, 1.0, 3.0)
    else:
        compute_loss = module.make_compute_loss(criterion, teacher, "fp32", 1.0, 1.0, 1.0, 1.0)
    loss, terms = compute_loss(student, batch)
    loss.backward()
    assert all(torch.isfinite(v) for v in terms.values())
    assert student.classifier.weight.grad.abs().sum() > 0 and student.backbone[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


class TinySegmenter(torch.nn.Module):
    """A conv at stride 2 as a segmentation network: returns upsampled logits and, with return_features, its native
    ones (as the student does)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1)

    def forward(self, x, return_features=False):
        native = self.conv(x)
        logits = torch.nn.functional.interpolate(native, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return (logits, {"logits": native}) if return_features else logits


DDP_DIST_STEP = """
import os, sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
import torch, torch.distributed as dist
import distributed, test_methods, train_dist
dist.init_process_group("gloo")
rank = dist.get_rank()
batch = torch.load({batch!r})
torch.manual_seed(0)
net = test_methods.TinySegmenter()
ddp = torch.nn.parallel.DistributedDataParallel(net)
share = {{k: v[rank::2] for k, v in batch.items()}}  # rank r's share of the batch, as make_loader splits it
compute_loss = train_dist.make_compute_loss(torch.nn.CrossEntropyLoss(ignore_index=255), None, "fp32",
                                            1.0, 1.0, 1.0, 0.0)  # DIST alone (no CE)
loss, _ = compute_loss(ddp, share)
loss.backward()
if rank == 0:
    torch.save(net.conv.weight.grad, {out!r})
dist.barrier()  # neither process leaves while the other still talks to it (as engine.train ends)
distributed.end_process(0)  # as the scripts end under torchrun: Python's teardown can abort a gloo process
"""


def test_dist_under_ddp_is_the_mean_of_per_process_losses(tmp_path):
    """Under torchrun each process computes DIST (its intra-class term included) on its share; DDP averages the
    gradients. Checked against that definition computed in one process, and shown to differ from DIST of the whole
    batch, whose intra-class correlation spans both shares."""
    g = torch.Generator().manual_seed(3)
    batch = {"image": torch.randn(4, 3, 32, 32, generator=g), "mask": torch.randint(0, 5, (4, 32, 32), generator=g),
             "teacher_logits": torch.randn(4, 5, 4, 4, generator=g) * 3,
             "grid": torch.stack([common.sample_grid(32, 32, 32)] * 4)}
    batch["mask"][0, :12] = 255
    torch.save(batch, tmp_path / "batch.pt")
    script = tmp_path / "step.py"
    script.write_text(DDP_DIST_STEP.format(repo=REPO, tests=os.path.dirname(__file__), batch=str(tmp_path / "batch.pt"),
                                           out=str(tmp_path / "grad.pt")))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_grad = torch.load(tmp_path / "grad.pt")

    def grad_of(part):
        torch.manual_seed(0)
        net = TinySegmenter()
        compute_loss = train_dist.make_compute_loss(torch.nn.CrossEntropyLoss(ignore_index=255), None, "fp32", 1.0,
                                                    1.0, 1.0, 0.0)
        compute_loss(net, part)[0].backward()
        return net.conv.weight.grad
    shares = [{k: v[r::2] for k, v in batch.items()} for r in (0, 1)]
    per_process = (grad_of(shares[0]) + grad_of(shares[1])) / 2
    torch.testing.assert_close(ddp_grad, per_process, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(grad_of(batch), per_process, rtol=1e-3, atol=1e-6)
