"""Distillation: the KD loss against an independent formula, a frozen teacher, the teacher-logit cache (== live teacher
with augmentation off, invalidation), feature alignment, every distillation method's script from the command line,
and one epoch + --resume of every method equal to an uninterrupted run."""
import json
import os
import runpy
import sys
from unittest import mock

import numpy as np
import pytest
import torch

import common
import distill
import engine
import errors
import methods
import train_baseline
import train_feature_kd
import train_response_kd
from conftest import REPO, small_run_args
from methods import feature_kd

OUTPUTS = ("last.pth", "best.pth", "history.json", "config.json", "loss.png", "miou.png")
COMPARED = ("train_loss", "val_loss", "val_miou", "val_pixel_acc", "lr")


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


def test_frozen_teacher_gets_no_gradient_and_keeps_its_statistics(data_dir, toy_teacher, tmp_path):
    """One live-teacher KD step through the script's own set-up: the student learns, the teacher (weights and
    BatchNorm running statistics) stays exactly as loaded."""
    args = train_response_kd.get_args_parser().parse_args(
        small_run_args(data_dir, tmp_path / "run", "--teacher-weights", toy_teacher))
    teacher = distill.build_frozen_teacher(args.teacher_weights, 21, torch.device("cpu"), "fp32")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = common.build_student(21, pretrained=False)
    x, target = torch.randn(2, 3, 32, 32), torch.randint(0, 21, (2, 32, 32))
    with torch.no_grad():
        t_logits = teacher(x)
    train_response_kd.response_kd_loss(student(x), t_logits, target, 2.0).backward()
    assert student.classifier.weight.grad.abs().sum() > 0 and student.backbone[0][0].weight.grad.abs().sum() > 0
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running stats included: eval mode really froze them


def test_feature_alignment_shapes_and_loss():
    torch.manual_seed(0)
    student = common.build_student(21, pretrained=False).eval()
    teacher = common.build_teacher(21, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 96)
    _, sf = student(x, return_features=True)
    _, tf = teacher(x, return_features=True, upsample=False)
    for s, (t, c_s, c_t) in feature_kd.FEATURE_PAIRS.items():
        assert sf[s].shape[1] == c_s and tf[t].shape[1] == c_t
        assert tf[t].shape[-2:] == (8, 12) and sf[s].shape[-2:] == (4, 6)
    # against a plain float64 loop: 1 - <a, b> / (|a| |b|) per position, averaged (same size: no resizing)
    g = torch.Generator().manual_seed(1)
    feat, target = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 6, 3, 5, generator=g)
    adapter = torch.nn.Conv2d(4, 6, 1)
    aligned = adapter(feat).detach().double().numpy()
    t = target.double().numpy()
    expected = np.mean([1 - np.dot(aligned[b, :, y, x], t[b, :, y, x]) /
                        (np.linalg.norm(aligned[b, :, y, x]) * np.linalg.norm(t[b, :, y, x]))
                        for b in range(2) for y in range(3) for x in range(5)])
    assert train_feature_kd.cosine_feature_loss(feat, target, adapter).item() == pytest.approx(expected, rel=1e-5)
    # a student map at half the teacher's size is resized bilinearly before the comparison
    identity = torch.nn.Conv2d(4, 4, 1, bias=False)
    identity.weight.data = torch.eye(4).view(4, 4, 1, 1)
    small = torch.randn(1, 4, 3, 3, generator=g)
    big = torch.nn.functional.interpolate(small, size=(6, 6), mode="bilinear", align_corners=False)
    assert train_feature_kd.cosine_feature_loss(small, big, identity).item() == pytest.approx(0, abs=1e-6)
    assert train_feature_kd.cosine_feature_loss(small, -big, identity).item() == pytest.approx(2, abs=1e-6)


@pytest.fixture(scope="module")
def toy_teacher(data_dir, tmp_path_factory):
    """A teacher checkpoint as train_baseline.py --model teacher writes it (1 short epoch on the toy set)."""
    out = tmp_path_factory.mktemp("teacher")
    argv = small_run_args(data_dir, out, "--epochs", "1", "--model", "teacher", "--limit-train", "8",
                          "--limit-val", "4", "--image-size", "32")
    train_baseline.main(train_baseline.get_args_parser().parse_args(argv))
    return str(out / "best.pth")


def _toy_train_set(data_dir, tmp_path, limit=8):
    args = train_response_kd.get_args_parser().parse_args(
        ["--toy", "--data-dir", data_dir, "--image-size", "64", "--limit-train", str(limit), "--workers", "0",
         "--cache-dir", str(tmp_path / "cache")])
    return common.build_datasets(common.data_config(args), splits=("train",))["train"]


# unit roundoff of each type: the cache stores fp16 (2^-11); a bf16 teacher computes with 2^-8
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cached_logits_equal_live_teacher_without_augmentation(precision, data_dir, toy_teacher, tmp_path):
    teacher = common.load_model(toy_teacher)[0].eval()
    dataset = _toy_train_set(data_dir, tmp_path)
    cpu = torch.device("cpu")
    cache = distill.TeacherLogitCache(teacher, dataset, cpu, 4, 0, precision)
    assert cache.build_s > 0 and cache.size_mb > 0
    dataset.teacher_logits, dataset.augment = cache, False
    batches = [common.collate([dataset[i] for i in range(k, k + 4)]) for k in (0, 4)]  # the cache's batches
    cached = torch.cat([distill.cached_teacher_logits(b) for b in batches])
    with torch.no_grad(), engine.autocast(cpu, precision):  # as train_response_kd.py --no-teacher-cache runs it
        live = torch.cat([teacher(b["image"].contiguous(memory_format=torch.channels_last)).float() for b in batches])
    scale = live.abs().max().item()
    # fp16 storage (half an fp16 ulp) plus, in bf16, a few roundoffs from the live path's own bf16 upsampling and
    # kernels: derived from the types used, the same on every CPU
    tolerance = (UNIT_ROUNDOFF["fp16"] + 8 * UNIT_ROUNDOFF[precision]) * scale
    torch.testing.assert_close(cached, live, rtol=0, atol=tolerance)
    mask = torch.cat([b["mask"] for b in batches])
    kd_cached = train_response_kd.response_kd_loss(live * 0.5, cached, mask, 2.0)
    kd_live = train_response_kd.response_kd_loss(live * 0.5, live, mask, 2.0)
    assert kd_cached.item() == pytest.approx(kd_live.item(), rel=1e-3, abs=1e-4)
    if precision == "bf16":  # bf16 targets stay within a few bf16 roundoffs of the fp32 ones on average
        with torch.no_grad():
            exact = torch.cat([teacher(b["image"]) for b in batches])
        assert 0 < (cached - exact).abs().mean().item() <= 4 * UNIT_ROUNDOFF["bf16"] * scale
        assert (cached.argmax(1) == exact.argmax(1)).float().mean().item() >= 0.98
    # with augmentation on, the cached logits follow the sample's crop/flip: same shape as the mask
    dataset.augment = True
    item = dataset[0]
    warped = distill.cached_teacher_logits(common.collate([item]))
    assert warped.shape[-2:] == item["mask"].shape


def test_cache_is_reused_and_rebuilt_when_teacher_or_precision_changes(data_dir, toy_teacher, tmp_path):
    teacher = common.load_model(toy_teacher)[0].eval()
    dataset = _toy_train_set(data_dir, tmp_path, limit=4)
    cpu = torch.device("cpu")
    first = distill.TeacherLogitCache(teacher, dataset, cpu, 4, 0, "fp32")
    again = distill.TeacherLogitCache(teacher, dataset, cpu, 4, 0, "fp32")
    assert first.build_s > 0 and again.build_s == 0.0
    before = again(0).clone()
    bf16 = distill.TeacherLogitCache(teacher, dataset, cpu, 4, 0, "bf16")  # a cache built in fp32 is not reused
    assert bf16.build_s > 0 and not torch.equal(bf16(0), before)
    meta = json.loads(open(bf16.path[:-4] + ".json").read())
    assert meta["teacher_dtype"] == "bf16"
    assert distill.TeacherLogitCache(teacher, dataset, cpu, 4, 0, "fp32").build_s > 0  # nor the other way round
    with torch.no_grad():
        teacher.classifier[4].bias += 1.0  # different weights -> different key
    rebuilt = distill.TeacherLogitCache(teacher, dataset, cpu, 4, 0, "fp32")
    assert rebuilt.build_s > 0
    torch.testing.assert_close(rebuilt(0).float(), before.float() + 1.0, rtol=0, atol=1e-2)


DISTILLING = [name for name, m in methods.registry().items() if m.TEACHER != "none"]
# a few runs take the other paths: the live teacher for a logit method, a bf16 teacher for a feature method, the
# split on the device for a cached-logit and a live-teacher method
EXTRA = {"dist": ["--no-teacher-cache"], "feature-kd": ["--teacher-dtype", "bf16"],
         "response-kd": ["--data-on-device", "on"], "feature-cwd": ["--data-on-device", "on"]}


@pytest.mark.parametrize("name", DISTILLING)
def test_one_epoch_then_resume_equals_an_uninterrupted_run(name, data_dir, toy_teacher, tmp_path, capsys):
    """Every distillation method: 1 epoch (its train_<method>.py as a user runs it: its __main__ with sys.argv, in
    this process; the log names the teacher's precision and exactly the method's loss terms), then --resume to 2,
    gives the uninterrupted 2-epoch history to the last digit (random masks, dropout and augmentation included);
    outputs, recorded precisions, loss terms, and the method's own modules saved beside (not inside) the deployable
    student."""
    method = methods.registry()[name]
    out = tmp_path / "run"
    extra = EXTRA.get(name, [])
    base = small_run_args(data_dir, out, "--teacher-weights", toy_teacher, "--limit-train", "16", "--image-size", "32",
                          *extra)
    parse = methods.get_args_parser(method).parse_args
    script = os.path.join(REPO, methods.script_name(method))
    with mock.patch.object(sys, "argv", [script, *base, "--epochs", "1"]):
        runpy.run_path(script, run_name="__main__")  # ends the process only on failure (SystemExit)
    log = capsys.readouterr().out
    epoch = next(line for line in log.splitlines() if line.startswith("epoch   0 | train loss"))
    terms = epoch.split("(", 1)[1].split(")", 1)[0].split()[::2]  # "(ce 3.2 kd 0.07)" -> ce, kd
    for output in OUTPUTS:
        assert os.path.getsize(out / output) > 0, output
    dtype = "bf16" if "bf16" in extra else "fp32"
    assert f"runs in {dtype}" in log and sorted(terms) == sorted(method.TERMS), epoch
    config = json.loads((out / "config.json").read_text())
    assert config["teacher_dtype"] == dtype and config["amp"] == "fp32" and config["strategy"] == name
    resumed = methods.main(method, parse(base + ["--epochs", "2", "--resume"]))
    assert [h["epoch"] for h in resumed] == [0, 1]
    assert {f"train_loss_{t}" for t in method.TERMS} <= set(resumed[-1])
    straight = methods.main(method, parse(small_run_args(
        data_dir, tmp_path / "straight", "--teacher-weights", toy_teacher, "--limit-train", "16", "--image-size", "32",
        *extra, "--epochs", "2")))
    for a, b in zip(resumed, straight):
        assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}
    ckpt = torch.load(out / "last.pth", weights_only=True)
    modules = method.build_loss(parse(base), methods.Context(None, None, None)).modules
    assert set(ckpt["adapters"]) == set(modules.state_dict() if modules is not None else {})
    assert not any(k.startswith(("stage16", "layer", "align", "generator")) for k in ckpt["model"])
    assert common.load_model(str(out / "best.pth"))[1] == "student"


def test_a_bad_flag_value_of_a_script_is_one_argparse_line(capsys):
    """train_<method>.py run as a user runs it (its __main__ with sys.argv; every script's first epoch is run so in
    the resume test above): a bad flag value is one argparse line naming it, exit status 2."""
    cwd_script = os.path.join(REPO, "train_cwd.py")
    with mock.patch.object(sys, "argv", [cwd_script, "--tau", "0"]), pytest.raises(SystemExit) as e:
        runpy.run_path(cwd_script, run_name="__main__")
    assert e.value.code == 2 and "--tau: must be a finite number > 0, got 0" in capsys.readouterr().err


def test_live_bf16_teacher_and_bf16_training(data_dir, toy_teacher, tmp_path, capsys):
    """--no-teacher-cache with a bf16 teacher and --amp bf16 student training: the CPU bf16 paths (native or
    emulated)."""
    out = tmp_path / "run"
    argv = small_run_args(data_dir, out, "--teacher-weights", toy_teacher, "--limit-train", "8", "--image-size", "32",
                          "--epochs", "1", "--no-teacher-cache", "--teacher-dtype", "bf16", "--amp", "bf16")
    train_response_kd.main(train_response_kd.get_args_parser().parse_args(argv))
    log = capsys.readouterr().out
    assert "runs in bf16" in log and "precision bf16" in log and "teacher-logit cache" not in log
    config = json.loads((out / "config.json").read_text())
    assert config["teacher_dtype"] == "bf16" and config["amp"] == "bf16" and config["no_teacher_cache"]
    record = json.loads((out / "history.json").read_text())[0]
    assert all(np.isfinite(record[k]) for k in ("train_loss", "train_loss_kd", "train_loss_ce", "val_loss"))


def test_teacher_with_other_class_count_is_refused(data_dir, tmp_path):
    teacher_ckpt = tmp_path / "t5.pth"
    torch.save({"model": common.Teacher(5).state_dict(), "arch": "teacher"}, teacher_ckpt)
    args = train_response_kd.get_args_parser().parse_args(
        small_run_args(data_dir, tmp_path / "run", "--teacher-weights", str(teacher_ckpt), "--epochs", "1"))
    with pytest.raises(errors.UserError, match="has 5 classes but the data has 21"):
        train_response_kd.main(args)


def test_cache_fidelity_is_exact_without_augmentation_and_measures_the_warp(data_dir, toy_teacher, tmp_path):
    teacher = common.load_model(toy_teacher).model.eval()
    dataset = _toy_train_set(data_dir, tmp_path)
    cpu = torch.device("cpu")
    cache = distill.TeacherLogitCache(teacher, dataset, cpu, 4, 0, "fp32")
    dataset.augment = False  # the cached view is the live view: only fp16 storage separates them
    same = distill.cache_fidelity(teacher, dataset, cache, cpu, "fp32", batch_size=4)
    assert same["argmax_agreement"] >= 0.999 and abs(same["kl_live_cached"]) < 1e-4  # (float rounding: +-1e-9)
    assert same["pixels"] == int(sum((dataset[i]["mask"] != 255).sum() for i in range(len(dataset))))
    dataset.augment = True  # crops at another scale: the warped cache approximates the teacher's view of the crop
    warped = distill.cache_fidelity(teacher, dataset, cache, cpu, "fp32", batch_size=4)
    assert warped["kl_live_cached"] > same["kl_live_cached"] and dataset.teacher_logits is None


def test_feature_kd_probe_reports_each_term_against_ce(data_dir, toy_teacher, tmp_path, capsys):
    """tools/feature_kd_probe.py on a 1-epoch feature-KD run: gradient norms of every term and each feature term's
    cosine with CE, for the fresh and the trained student; the last stdout line is that JSON."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import feature_kd_probe
    out = tmp_path / "run"
    train_feature_kd.main(train_feature_kd.get_args_parser().parse_args(
        small_run_args(data_dir, out, "--teacher-weights", toy_teacher, "--limit-train", "8", "--image-size", "32",
                       "--epochs", "1")))
    result = feature_kd_probe.main(feature_kd_probe.get_args_parser().parse_args([str(out), "--batches", "1"]))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert set(result) == {"start", "after epoch 0"}
    for figures in result.values():
        assert set(figures) == {"ce_grad_norm", "feat_stage16_grad_norm", "feat_stage16_cos_with_ce",
                                "feat_head_grad_norm", "feat_head_cos_with_ce"}
        assert all(v > 0 for k, v in figures.items() if k.endswith("norm"))
        assert all(-1 <= v <= 1 for k, v in figures.items() if k.endswith("cos_with_ce"))
