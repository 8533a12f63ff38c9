"""Bad input and unsafe situations stop with one line, before any slow work, and lose nothing: runs that would mix
(same --out-dir), diverged runs, resumes with other settings, code hidden in a checkpoint, unwritable outputs,
out-of-range flags, missing pretrained weights, signals while a cache is being built, several bad files at once."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import distill
import engine
import errors
import evaluate
import train_baseline
import train_feature_kd
import train_response_kd
import voc
from conftest import REPO, assert_flag_refused, loop_config, small_run_args, toy_data_config


def run_baseline(argv):
    return train_baseline.main(train_baseline.get_args_parser().parse_args(argv))


def test_second_run_on_the_same_folder_is_refused_naming_the_holder(data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "run.lock").write_text(str(holder.pid))
        with pytest.raises(errors.UserError, match=f"in use by another run \\(pid {holder.pid}"):
            run_baseline(small_run_args(data_dir, out, "--epochs", "1", "--image-size", "32"))
        assert sorted(os.listdir(out)) == ["run.lock"]  # nothing of the second run was written
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone now: its lock is stale and does not block; a finished run releases its own
    run_baseline(small_run_args(data_dir, out, "--epochs", "1", "--image-size", "32"))
    assert (out / "best.pth").is_file() and not (out / "run.lock").exists()


def test_diverged_run_stops_and_never_saves_a_best_model(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(errors.UserError, match="non-finite loss|diverged"):
        run_baseline(small_run_args(data_dir, out, "--epochs", "3", "--image-size", "32", "--lr", "1e6"))
    assert not (out / "best.pth").exists()
    assert_flag_refused(train_baseline, ["--toy", "--lr", "inf"], capsys)


def test_check_not_diverged_against_nan_val_loss_and_weights(tmp_path):
    model = torch.nn.Linear(2, 2)
    engine.check_not_diverged(model, {"loss": 1.0}, 0, str(tmp_path))  # healthy: nothing happens
    with pytest.raises(errors.UserError, match="diverged at epoch 4 \\(val loss nan\\)"):
        engine.check_not_diverged(model, {"loss": float("nan")}, 4, str(tmp_path))
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(errors.UserError, match="non-finite weights"):
        engine.check_not_diverged(model, {"loss": 1.0}, 4, str(tmp_path))


def test_resume_with_other_experiment_flags_lists_the_differences(data_dir, tmp_path):
    out = tmp_path / "run"
    base = small_run_args(data_dir, out, "--image-size", "32")
    run_baseline(base + ["--epochs", "1"])
    config = (out / "config.json").read_text()
    with pytest.raises(errors.UserError, match=r"--image-size 32 -> 64; --lr 0.0001 -> 0.001\)"):
        run_baseline(base + ["--epochs", "2", "--resume", "--image-size", "64", "--lr", "1e-3"])
    assert (out / "config.json").read_text() == config  # untouched
    # flags that do not change the experiment may differ; the resume line says there is a best already
    run_baseline(base + ["--epochs", "2", "--resume", "--workers", "1", "--log-every", "3"])
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [0, 1]


class _RunsCode:
    def __reduce__(self):
        return (os.makedirs, (os.environ["MARKER_DIR"],))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "code_ran"
    monkeypatch.setenv("MARKER_DIR", str(marker))
    evil = tmp_path / "best.pth"
    torch.save({"model": _RunsCode()}, evil)
    with pytest.raises(errors.UserError, match="refused: it holds pickled Python objects"):
        evaluate.main(evaluate.get_args_parser().parse_args(["--weights", str(evil), "--toy"]))
    assert not marker.exists()
    # what this repo writes loads safely: a training checkpoint with optimizer, scheduler, RNG and partial state
    cfg = loop_config(data=toy_data_config(tmp_path), out_dir=str(tmp_path), flags={"lr": 0.1})
    ckpt = engine.make_checkpoint(torch.nn.Linear(2, 2), torch.nn.ModuleDict(), *_optimizer_and_scheduler(),
                                  None, engine.RunState(1, None, [], engine.EpochProgress(1, step=3)), cfg, "student")
    engine.save_checkpoint(ckpt, str(tmp_path / "last.pth"))
    assert common.read_checkpoint(str(tmp_path / "last.pth"))["partial"]["step"] == 3


def _optimizer_and_scheduler():
    opt = torch.optim.Adam(torch.nn.Linear(2, 2).parameters())
    return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max")


def test_unwritable_outputs_and_cache_fail_before_any_work(data_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(errors.UserError, match="--json .*m.json: .*a_file is a file, not a folder"):
        evaluate.main(evaluate.get_args_parser().parse_args(
            ["--weights", str(tmp_path / "missing.pth"), "--json", str(blocker / "m.json")]))
    with pytest.raises(errors.UserError, match="--save-vis .*vis: .*a_file is a file, not a folder"):
        evaluate.main(evaluate.get_args_parser().parse_args(
            ["--weights", str(tmp_path / "missing.pth"), "--save-vis", str(blocker / "vis")]))
    with pytest.raises(errors.UserError, match="cannot write the cache .* point --cache-dir at a writable folder"):
        run_baseline(small_run_args(data_dir, tmp_path / "run", "--epochs", "1", "--cache-dir", str(blocker / "c")))


@pytest.mark.parametrize("module,flag,value", [
    (train_baseline, "--weight-decay", "-1"), (train_baseline, "--workers", "-1"),
    (train_baseline, "--image-size", "7"),
    (train_baseline, "--lr-patience", "-1"), (train_baseline, "--lr-factor", "1.5"), (train_baseline, "--lr", "nan"),
    (train_response_kd, "--ce-weight", "-0.5"), (train_response_kd, "--teacher-dtype", "fp8"),
    (train_feature_kd, "--feat-weight", "inf"), (evaluate, "--eval-size", "1"), (train_baseline, "--amp", "fp64"),
])
def test_numeric_flags_are_range_checked(module, flag, value, capsys):
    assert_flag_refused(module, ["--toy", flag, value], capsys)


def test_help_describes_what_each_script_does_with_the_flag():
    """Issue 26 item 8: evaluate.py's --help spoke of a gradient scaler and training crops, which it has none of."""
    import time_student
    for module, trains in ((evaluate, False), (time_student, False), (train_baseline, True)):
        text = " ".join(module.get_args_parser().format_help().split())
        assert ("gradient scaler" in text) == ("training crops" in text) == trains, module.__name__
        assert trains or "each image resized to N x N" in text


def test_missing_pretrained_weights_stop_before_the_pixel_cache(data_dir, tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "train_baseline.py", "--toy", "--data-dir", data_dir, "--cache-dir",
                           str(cache), "--out-dir", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, TORCH_HOME=str(tmp_path / "empty_torch_home")))
    assert proc.returncode == 1
    assert "mobilenet_v3_large-8738ca79.pth" in proc.stderr.strip().splitlines()[-1]
    assert not cache.exists() and not (tmp_path / "run").exists()  # no slow work was done, nothing left behind


def _signal_self_on_call(n, sig=15):
    """A function that sends sig to this process on its n-th call (while a cache is being built)."""
    calls = []

    def hook(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), sig)
    return hook


def test_signal_while_building_the_pixel_cache_leaves_nothing_half_built(toy_root, tmp_path, monkeypatch):
    real_read_image = voc.read_image
    hook = _signal_self_on_call(5)

    def read_image(path):
        hook()
        return real_read_image(path)
    monkeypatch.setattr(voc, "read_image", read_image)
    with pytest.raises(errors.Interrupted, match="interrupted by SIGTERM while building the pixel cache"):
        voc.PixelCache(toy_root, "val", str(tmp_path / "cache"))
    folder = next((tmp_path / "cache").iterdir())
    assert os.listdir(folder) == ["build.lock"]  # (empty) no temporary memmaps, no index: the next run starts over
    monkeypatch.setattr(voc, "read_image", real_read_image)
    cache = voc.PixelCache(toy_root, "val", str(tmp_path / "cache"))
    assert len(cache) == 100 and cache.get(99)[0].shape[2] == 3


def test_signal_while_building_the_teacher_cache_leaves_nothing_half_built(data_dir, tmp_path):
    args = train_response_kd.get_args_parser().parse_args(
        ["--toy", "--data-dir", data_dir, "--image-size", "32", "--limit-train", "8", "--workers", "0",
         "--cache-dir", str(tmp_path / "cache")])
    dataset = common.build_datasets(common.data_config(args), splits=("train",))["train"]
    teacher = common.build_teacher(21, pretrained=False).eval()
    handle = teacher.register_forward_hook(_signal_self_on_call(2))
    with pytest.raises(errors.Interrupted, match="interrupted by SIGTERM while building the teacher-logit cache"):
        distill.TeacherLogitCache(teacher, dataset, torch.device("cpu"), 4, 0, "fp32")
    assert not [f for f in os.listdir(dataset.cache.dir) if f.startswith("teacher_logits")]
    handle.remove()
    assert distill.TeacherLogitCache(teacher, dataset, torch.device("cpu"), 4, 0, "fp32").build_s > 0


def test_every_bad_file_is_named_in_one_error(toy_root, tmp_path):
    import shutil
    root = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(toy_root, root)
    (root / "JPEGImages" / "toy_val_0003.jpg").write_bytes(b"not a jpeg")
    mask_path = root / "SegmentationClass" / "toy_val_0011.png"
    voc.save_mask_png(np.full((20, 20), 40, np.uint8), mask_path)  # wrong values and wrong size
    truncated = root / "JPEGImages" / "toy_val_0042.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(errors.UserError) as e:
        voc.PixelCache(str(root), "val", str(tmp_path / "cache"))
    message = str(e.value)
    assert message.startswith("3 problem(s)") and len(message.splitlines()) == 4
    for name in ("toy_val_0003.jpg", "toy_val_0011.png", "toy_val_0042.jpg"):
        assert name in message
