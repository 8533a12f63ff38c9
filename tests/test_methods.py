"""Every method's loss against an independent float64 loop (CWD, DIST, LSKD, feature CWD, MGD, pair-wise, AT) and the
properties that matter (zero when student == teacher, growth with the difference, 255 pixels ignored, invariances),
gradients only into the student and the method's own modules, the registry (every method found, with its script,
flags and terms), the deprecated flag names, and DIST's per-process intra-class term under DistributedDataParallel."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import engine
import methods
import train_at
import train_cwd
import train_dist
import train_feature_cwd
import train_lskd
import train_mgd
import train_pairwise
from conftest import REPO
from methods import dist as dist_method


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
        got_inter, got_intra = dist_method.dist_terms(s, t, target, tau)
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
    inter, intra = dist_method.dist_terms(t, t, target, 1.0)
    assert inter.item() == pytest.approx(0.0, abs=1e-6) and intra.item() == pytest.approx(0.0, abs=1e-6)
    assert train_dist.dist_loss(s, t, torch.full_like(target, 255), 1.0, 1.0, 1.0).item() == 0.0


def method_loss(name, teacher=None, ce_weight=None):
    """A method's Loss with its defaults as its script builds it (teacher None: logits from the batch's cache)."""
    method = methods.registry()[name]
    args = methods.get_args_parser(method).parse_args([] if ce_weight is None else [f"--ce-weight={ce_weight}"])
    return method.build_loss(args, methods.Context(torch.nn.CrossEntropyLoss(ignore_index=255), teacher, "fp32"))


DISTILLING = [name for name, m in methods.registry().items() if m.TEACHER != "none"]


@pytest.mark.parametrize("name", DISTILLING)
def test_gradients_reach_the_student_and_its_modules_only(name):
    """One step of the method's compute_loss with a live frozen teacher: the student and the method's own modules
    (aligners, generators) get gradients, the teacher none; the terms are the method's TERMS, all finite."""
    torch.manual_seed(0)
    teacher = common.build_teacher(21, pretrained=False).eval().requires_grad_(False)  # as build_frozen_teacher
    student = common.build_student(21, pretrained=False)
    image = torch.randn(2, 3, 32, 32)
    batch = {"image": image, "mask": torch.randint(0, 21, (2, 32, 32)),
             "grid": torch.stack([common.sample_grid(32, 32, 32)] * 2)}
    loss = method_loss(name, teacher)
    modules = loss.modules if loss.modules is not None else torch.nn.ModuleDict()
    total, terms = loss.compute_loss(engine.TrainModule(student, modules), batch)
    total.backward()
    assert tuple(sorted(terms)) == tuple(sorted(methods.registry()[name].TERMS))
    assert all(torch.isfinite(v) for v in terms.values())
    assert student.classifier.weight.grad.abs().sum() > 0 and student.backbone[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in modules.parameters())
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
import distributed, test_methods
dist.init_process_group("gloo")
rank = dist.get_rank()
batch = torch.load({batch!r})
torch.manual_seed(0)
net = test_methods.TinySegmenter()
ddp = torch.nn.parallel.DistributedDataParallel(net)
share = {{k: v[rank::2] for k, v in batch.items()}}  # rank r's share of the batch, as make_loader splits it
compute_loss = test_methods.method_loss("dist", ce_weight=0).compute_loss  # DIST alone (no CE), default tau 1
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
        compute_loss = method_loss("dist", ce_weight=0).compute_loss
        compute_loss(net, part)[0].backward()
        return net.conv.weight.grad
    shares = [{k: v[r::2] for k, v in batch.items()} for r in (0, 1)]
    per_process = (grad_of(shares[0]) + grad_of(shares[1])) / 2
    torch.testing.assert_close(ddp_grad, per_process, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(grad_of(batch), per_process, rtol=1e-3, atol=1e-6)


# --- LSKD -------------------------------------------------------------------------------------------------------------

def lskd_loop(s, t, tau, valid):
    """LSKD written out: per kept pixel, z-score over classes (unbiased std, +1e-7), softened KL, mean, tau^2."""
    total, n = 0.0, 0
    b, _, h, w = s.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if not valid[i, y, x]:
                    continue
                zs, zt = (s[i, :, y, x].double().numpy(), t[i, :, y, x].double().numpy())
                zs = (zs - zs.mean()) / (1e-7 + zs.std(ddof=1))
                zt = (zt - zt.mean()) / (1e-7 + zt.std(ddof=1))
                ps, pt = softmax64(zs / tau), softmax64(zt / tau)
                total += float(np.sum(pt * (np.log(pt) - np.log(ps))))
                n += 1
    return total / n * tau ** 2


def test_lskd_loss_against_a_float64_loop_and_its_invariance():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 5, 4, 3, generator=g), torch.randn(2, 5, 4, 3, generator=g) * 3
    valid = torch.rand(2, 4, 3, generator=g) > 0.3
    for tau in (1.0, 2.0):
        assert train_lskd.lskd_loss(s, t, tau, valid).item() == pytest.approx(lskd_loop(s, t, tau, valid), rel=1e-5)
    everywhere = torch.ones(2, 4, 3, dtype=torch.bool)
    assert train_lskd.lskd_loss(s, t, 2.0).item() == pytest.approx(lskd_loop(s, t, 2.0, everywhere), rel=1e-5)
    assert train_lskd.lskd_loss(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    # what standardising buys: a student whose logits are the teacher's scaled and shifted per pixel has no loss left
    # (response KD would still pull on the scale)
    scale, shift = torch.rand(2, 1, 4, 3, generator=g) * 5 + 0.1, torch.randn(2, 1, 4, 3, generator=g) * 10
    assert train_lskd.lskd_loss(t * scale + shift, t, 2.0).item() == pytest.approx(0.0, abs=1e-5)
    assert train_lskd.lskd_loss(s * scale + shift, t, 2.0).item() == pytest.approx(
        train_lskd.lskd_loss(s, t, 2.0).item(), rel=1e-4)
    assert train_lskd.lskd_loss(s, t, 2.0, torch.zeros_like(valid)).item() == 0.0  # nothing to compare: 0, not NaN


# --- feature CWD ------------------------------------------------------------------------------------------------------

def test_feature_cwd_against_a_float64_loop():
    """The aligned student map's CWD: the 1x1 aligner written out as a matrix product, then cwd_loop; averaged over
    the teacher's channels (the ones the sum runs over)."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 6, 4, 5, generator=g)
    align = torch.nn.Conv2d(3, 6, 1, bias=False)
    w = align.weight.detach().double().numpy()[:, :, 0, 0]
    aligned = torch.from_numpy(np.einsum("oc,bchw->bohw", w, s.double().numpy()))
    for tau in (1.0, 4.0):
        expected = cwd_loop(aligned, t, tau)  # its mean runs over n x 6 (teacher) channel maps
        assert train_feature_cwd.feature_cwd_loss(s, t, align, tau).item() == pytest.approx(expected, rel=1e-5)
    identity = torch.nn.Conv2d(6, 6, 1, bias=False)
    identity.weight.data = torch.eye(6).view(6, 6, 1, 1)
    assert train_feature_cwd.feature_cwd_loss(t, t, identity, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    # a stride-16 map is compared after 2x bilinear upsampling to the teacher's stride 8
    small = torch.randn(1, 6, 2, 3, generator=g)
    big = torch.nn.functional.interpolate(small, size=(4, 6), mode="bilinear", align_corners=False)
    assert train_feature_cwd.feature_cwd_loss(small, big, identity, 4.0).item() == pytest.approx(0.0, abs=1e-6)


# --- MGD --------------------------------------------------------------------------------------------------------------

def conv3x3_loop(x, weight, bias):
    """A 3x3 convolution with zero padding 1, written out in float64: x (C, H, W), weight (O, C, 3, 3)."""
    c, h, w = x.shape
    padded = np.zeros((c, h + 2, w + 2))
    padded[:, 1:-1, 1:-1] = x
    out = np.zeros((weight.shape[0], h, w))
    for o in range(weight.shape[0]):
        for y in range(h):
            for xx in range(w):
                out[o, y, xx] = np.sum(weight[o] * padded[:, y:y + 3, xx:xx + 3]) + bias[o]
    return out


def test_mgd_loss_against_a_float64_loop():
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    s, t = torch.randn(2, 2, 3, 4, generator=g), torch.randn(2, 3, 3, 4, generator=g)
    align = torch.nn.Conv2d(2, 3, 1)
    generator = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(3, 3, 3, padding=1))
    keep = (torch.rand(2, 1, 3, 4, generator=g) > 0.5).float()
    p = {k: v.detach().double().numpy() for k, v in {"aw": align.weight, "ab": align.bias, "w1": generator[0].weight,
                                                     "b1": generator[0].bias, "w2": generator[2].weight,
                                                     "b2": generator[2].bias}.items()}
    total = 0.0
    for i in range(2):
        aligned = np.einsum("oc,chw->ohw", p["aw"][:, :, 0, 0], s[i].double().numpy()) + p["ab"][:, None, None]
        masked = aligned * keep[i].double().numpy()  # (1, H, W): one draw per position, shared by the channels
        hidden = np.maximum(conv3x3_loop(masked, p["w1"], p["b1"]), 0)
        generated = conv3x3_loop(hidden, p["w2"], p["b2"])
        total += float(np.sum((generated - t[i].double().numpy()) ** 2))
    expected = total / 2  # summed squared error / N (the authors' MSELoss(reduction='sum') / N)
    assert train_mgd.mgd_loss(s, t, align, generator, keep).item() == pytest.approx(expected, rel=1e-5)


def test_mgd_is_zero_when_the_generator_rebuilds_the_teacher_and_masks_at_its_ratio():
    from methods import mgd
    f = torch.rand(2, 3, 4, 4)  # non-negative: the ReLU between two identity convs passes it through
    identity1x1 = torch.nn.Conv2d(3, 3, 1)
    identity1x1.weight.data, identity1x1.bias.data = torch.eye(3).view(3, 3, 1, 1), torch.zeros(3)
    identity3x3 = torch.nn.Conv2d(3, 3, 3, padding=1)
    identity3x3.weight.data = torch.zeros(3, 3, 3, 3)
    identity3x3.weight.data[:, :, 1, 1] = torch.eye(3)
    identity3x3.bias.data = torch.zeros(3)
    generator = torch.nn.Sequential(identity3x3, torch.nn.ReLU(), identity3x3)
    keep_all = mgd.random_keep(f, 0.0)
    assert keep_all.shape == (2, 1, 4, 4) and bool((keep_all == 1).all())
    assert train_mgd.mgd_loss(f, f, identity1x1, generator, keep_all).item() == pytest.approx(0.0, abs=1e-10)
    torch.manual_seed(0)
    big = torch.zeros(64, 512, 32, 32)
    assert mgd.random_keep(big, 0.75).mean().item() == pytest.approx(0.25, abs=0.01)  # 65,536 draws


# --- pair-wise --------------------------------------------------------------------------------------------------------

def similarity_loop(f, scale):
    """Max-pool nodes (kernel int(size * scale), ceil mode: edge windows clipped), L2-normalised, cosine matrix."""
    c, h, w = f.shape
    kh, kw = int(h * scale), int(w * scale)
    nodes = []
    for y in range(0, h, kh):
        for x in range(0, w, kw):
            v = f[:, y:y + kh, x:x + kw].reshape(c, -1).max(axis=1)
            nodes.append(v / (np.sqrt(np.sum(v ** 2)) + 1e-8))
    nodes = np.array(nodes)
    return nodes @ nodes.T


def test_pairwise_loss_against_a_float64_loop():
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(2, 3, 5, 6, generator=g), torch.randn(2, 4, 5, 6, generator=g)  # channels differ: no adapter
    for scale in (0.5, 0.34):
        total, nodes = 0.0, None
        for i in range(2):
            ms, mt = similarity_loop(s[i].double().numpy(), scale), similarity_loop(t[i].double().numpy(), scale)
            total += float(np.sum((ms - mt) ** 2))
            nodes = ms.shape[0]
        expected = total / nodes ** 2 / 2
        assert train_pairwise.pairwise_loss(s, t, scale).item() == pytest.approx(expected, rel=1e-5)
    assert nodes == 15  # scale 0.34 of 5 x 6: kernels 1 x 2, 5 x 3 nodes
    assert similarity_loop(s[0].double().numpy(), 0.5).shape == (6, 6)  # kernels 2 x 3, ceil mode: 3 x 2 nodes
    assert train_pairwise.pairwise_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)
    scaled = train_pairwise.pairwise_loss(3.0 * s, t).item()  # cosines: scale-free
    assert scaled == pytest.approx(train_pairwise.pairwise_loss(s, t).item(), rel=1e-5)


# --- AT ---------------------------------------------------------------------------------------------------------------

def test_at_loss_against_a_float64_loop():
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 7, 4, 5, generator=g)
    total = 0.0
    for i in range(2):
        a_s = (s[i].double().numpy() ** 2).mean(axis=0).ravel()
        a_t = (t[i].double().numpy() ** 2).mean(axis=0).ravel()
        total += float(np.sum((a_s / np.linalg.norm(a_s) - a_t / np.linalg.norm(a_t)) ** 2))
    expected = total / (2 * 20)  # the mean over images and positions
    assert train_at.at_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert train_at.at_loss(t, t).item() == pytest.approx(0.0, abs=1e-8)
    assert train_at.at_loss(2.0 * t[:, :3], t[:, :3]).item() == pytest.approx(0.0, abs=1e-8)  # the map is normalised
    # a stride-16 map is compared after 2x bilinear upsampling of the feature to the teacher's positions
    small = torch.rand(1, 3, 2, 3, generator=g)
    big = torch.nn.functional.interpolate(small, size=(4, 6), mode="bilinear", align_corners=False)
    assert train_at.at_loss(small, big).item() == pytest.approx(0.0, abs=1e-8)


# --- the registry -----------------------------------------------------------------------------------------------------

def test_registry_finds_every_method_with_its_script_flags_and_terms():
    registry = methods.registry()
    assert list(registry)[0] == "baseline"
    assert {"response-kd", "cwd", "dist", "lskd", "feature-kd", "feature-cwd", "mgd", "pairwise", "at"} <= set(registry)
    assert "response-kd-live" in methods.strategies()
    for name, method in registry.items():
        script = methods.script_name(method)
        assert os.path.isfile(os.path.join(REPO, script)), script
        assert method.TEACHER in ("none", "logits", "features") and method.TERMS[0] == "ce"
        dests = vars(methods.get_args_parser(method).parse_args([]))
        for term in method.TERMS[1:]:  # every distillation term has its --<term>-weight (DIST: two terms)
            assert f"{term}_weight" in dests, (name, term)
        assert ("no_teacher_cache" in dests) == (method.TEACHER == "logits"), name


def test_old_flag_names_still_work_and_say_so(capsys):
    parser = methods.get_args_parser(methods.registry()["response-kd"])
    args = parser.parse_args(["--temperature", "3", "--soft-target-weight", "0.25"])
    assert args.tau == 3.0 and args.kd_weight == 0.25
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: --temperature is deprecated and will be removed; it sets --tau, use that instead",
                   "warning: --soft-target-weight is deprecated and will be removed; it sets --kd-weight, use that "
                   "instead"]
    assert parser.parse_args([]).tau == 2.0 and capsys.readouterr().err == ""  # defaults untouched, no warning
    dist = methods.get_args_parser(methods.registry()["dist"]).parse_args(["--beta", "2", "--gamma", "0.5"])
    assert (dist.dist_inter_weight, dist.dist_intra_weight) == (2.0, 0.5)
    assert "--temperature" not in [o for a in methods.get_args_parser(methods.registry()["cwd"])._actions
                                   for o in a.option_strings]  # only where the old name meant this flag
    with pytest.raises(SystemExit):
        parser.parse_args(["--temperature", "0"])  # the old name keeps the new one's checks
