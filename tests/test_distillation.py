"""Distillation: the KD loss against an independent formula, gradients, the teacher-logit cache (== live teacher
with augmentation off, invalidation), feature alignment, and both scripts' CLIs incl. resume."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import train_baseline
import train_feature_kd
import train_response_kd
from conftest import REPO, small_run_args

OUTPUTS = ("last.pth", "best.pth", "history.json", "config.json", "loss.png", "miou.png")


def test_response_kd_loss_against_independent_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 4, 3, generator=g), torch.randn(2, 5, 4, 3, generator=g) * 3
    target = torch.randint(0, 5, (2, 4, 3), generator=g)
    target[0, 0, :] = 255
    target[1, 2, 1] = 255
    T = 3.0
    total, n = 0.0, 0
    for b in range(2):  # plain per-pixel loops in float64, KL(p_t || p_s) = sum p_t (log p_t - log p_s)
        for y in range(4):
            for x in range(3):
                if target[b, y, x] == 255:
                    continue
                ps = np.exp(s[b, :, y, x].double().numpy() / T)
                ps /= ps.sum()
                pt = np.exp(t[b, :, y, x].double().numpy() / T)
                pt /= pt.sum()
                total += float(np.sum(pt * (np.log(pt) - np.log(ps))))
                n += 1
    expected = total / n * T * T
    assert train_response_kd.response_kd_loss(s, t, target, T).item() == pytest.approx(expected, rel=1e-5)
    # identical distributions give zero; all pixels ignored gives zero, not NaN
    assert train_response_kd.response_kd_loss(t, t, target, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert train_response_kd.response_kd_loss(s, t, torch.full_like(target, 255), T).item() == 0.0


def test_gradient_reaches_student_not_teacher():
    torch.manual_seed(0)
    student = common.build_student(21, pretrained=False)
    teacher = common.build_teacher(21, pretrained=False).eval().requires_grad_(False)
    x = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 21, (2, 64, 64))
    with torch.no_grad():
        t_logits = teacher(x)
    loss = train_response_kd.response_kd_loss(student(x), t_logits, target, 2.0)
    loss.backward()
    assert student.classifier.weight.grad is not None and student.classifier.weight.grad.abs().sum() > 0
    assert student.backbone[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_feature_alignment_shapes_and_loss():
    torch.manual_seed(0)
    student = common.build_student(21, pretrained=False).eval()
    teacher = common.build_teacher(21, pretrained=False).eval()
    adapters = train_feature_kd.build_adapters()
    x = torch.randn(2, 3, 64, 96)
    _, sf = student(x, return_features=True)
    _, tf = teacher(x, return_features=True, upsample=False)
    for s, (t, c_s, c_t) in train_feature_kd.FEATURE_PAIRS.items():
        assert sf[s].shape[1] == c_s and tf[t].shape[1] == c_t
        assert tf[t].shape[-2:] == (8, 12) and sf[s].shape[-2:] == (4, 6)
        loss = train_feature_kd.cosine_feature_loss(sf[s], tf[t], adapters[s])
        assert 0 <= loss.item() <= 2
    # the loss is 1 - cosine: an adapter output equal to the (resized) teacher gives 0
    feat = torch.randn(1, 4, 3, 3)
    identity = torch.nn.Conv2d(4, 4, 1, bias=False)
    identity.weight.data = torch.eye(4).view(4, 4, 1, 1)
    assert train_feature_kd.cosine_feature_loss(feat, feat, identity).item() == pytest.approx(0, abs=1e-6)
    assert train_feature_kd.cosine_feature_loss(feat, -feat, identity).item() == pytest.approx(2, abs=1e-6)


@pytest.fixture(scope="module")
def toy_teacher(data_dir, tmp_path_factory):
    """A teacher checkpoint as train_baseline.py --model teacher writes it (1 short epoch on the toy set)."""
    out = tmp_path_factory.mktemp("teacher")
    argv = small_run_args(data_dir, out, "--epochs", "1", "--model", "teacher", "--limit-train", "16")
    train_baseline.main(train_baseline.get_args_parser().parse_args(argv))
    return str(out / "best.pth")


def _toy_train_set(data_dir, tmp_path, limit=8):
    args = train_response_kd.get_args_parser().parse_args(
        ["--toy", "--data-dir", data_dir, "--image-size", "64", "--limit-train", str(limit), "--workers", "0",
         "--cache-dir", str(tmp_path / "cache")])
    common.setup_run(args, "test")
    return common.build_datasets(args, splits=("train",))[0]["train"]


def test_cached_logits_equal_live_teacher_without_augmentation(data_dir, toy_teacher, tmp_path):
    teacher = common.load_model(toy_teacher)[0].eval()
    dataset = _toy_train_set(data_dir, tmp_path)
    cache = common.TeacherLogitCache(teacher, dataset, torch.device("cpu"), 4, 0)
    assert cache.build_s > 0 and cache.size_mb > 0
    dataset.extra, dataset.augment = cache, False
    batch = common.collate([dataset[i] for i in range(len(dataset))])
    cached = common.cached_teacher_logits(batch)
    with torch.no_grad():
        live = teacher(batch["image"])
    scale = live.abs().max().item()
    torch.testing.assert_close(cached, live, rtol=0, atol=2e-3 * max(scale, 1.0))  # fp16 storage
    kd_cached = train_response_kd.response_kd_loss(live * 0.5, cached, batch["mask"], 2.0)
    kd_live = train_response_kd.response_kd_loss(live * 0.5, live, batch["mask"], 2.0)
    assert kd_cached.item() == pytest.approx(kd_live.item(), rel=1e-3, abs=1e-4)
    # with augmentation on, the cached logits follow the sample's crop/flip: same shape as the mask
    dataset.augment = True
    item = dataset[0]
    warped = common.cached_teacher_logits(common.collate([item]))
    assert warped.shape[-2:] == item["mask"].shape


def test_cache_is_reused_and_rebuilt_when_teacher_changes(data_dir, toy_teacher, tmp_path):
    teacher = common.load_model(toy_teacher)[0].eval()
    dataset = _toy_train_set(data_dir, tmp_path, limit=4)
    first = common.TeacherLogitCache(teacher, dataset, torch.device("cpu"), 4, 0)
    again = common.TeacherLogitCache(teacher, dataset, torch.device("cpu"), 4, 0)
    assert first.build_s > 0 and again.build_s == 0.0
    before = again(0).clone()
    with torch.no_grad():
        teacher.classifier[4].bias += 1.0  # different weights -> different key
    rebuilt = common.TeacherLogitCache(teacher, dataset, torch.device("cpu"), 4, 0)
    assert rebuilt.build_s > 0
    torch.testing.assert_close(rebuilt(0).float(), before.float() + 1.0, rtol=0, atol=1e-2)


@pytest.mark.parametrize("script,extra", [
    ("train_response_kd.py", []),
    ("train_response_kd.py", ["--no-teacher-cache"]),
    ("train_feature_kd.py", []),
])
def test_kd_cli_one_epoch_then_resume(script, extra, data_dir, toy_teacher, tmp_path):
    out = tmp_path / "run"
    base = small_run_args(data_dir, out, "--teacher-weights", toy_teacher, "--limit-train", "16", *extra)
    proc = subprocess.run([sys.executable, script, *base, "--epochs", "1"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in OUTPUTS:
        assert os.path.getsize(out / name) > 0, name
    proc = subprocess.run([sys.executable, script, *base, "--epochs", "2", "--resume"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]
    terms = {"response": {"train_loss_ce", "train_loss_kd"},
             "feature": {"train_loss_ce", "train_loss_feat_stage16", "train_loss_feat_head"}}
    assert terms["feature" if "feature" in script else "response"] <= set(history[-1])
    ckpt = torch.load(out / "last.pth", weights_only=False)
    if "feature" in script:  # adapters saved for resume, but not in the deployable student
        assert set(ckpt["extra"]) == {"stage16.weight", "stage16.bias", "head.weight", "head.bias"}
    assert not any(k.startswith(("stage16", "layer")) for k in ckpt["model"])
    assert common.load_model(str(out / "best.pth"))[1] == "student"


def test_teacher_with_other_class_count_is_refused(data_dir, tmp_path):
    teacher_ckpt = tmp_path / "t5.pth"
    torch.save({"model": common.Teacher(5).state_dict(), "arch": "teacher"}, teacher_ckpt)
    args = train_response_kd.get_args_parser().parse_args(
        small_run_args(data_dir, tmp_path / "run", "--teacher-weights", str(teacher_ckpt), "--epochs", "1"))
    with pytest.raises(SystemExit, match="has 5 classes but the data has 21"):
        train_response_kd.main(args)
