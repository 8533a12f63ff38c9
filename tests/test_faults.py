"""Faults: SIGTERM inside an epoch (also forwarded twice by a wrapper, also on the device data path) and kill -9 both
resume to exactly the uninterrupted history; non-finite losses stop (or skip) naming the batch and term; a full disk keeps the old
checkpoint; a truncated JPEG is named."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import engine
import errors
import train_baseline
import train_response_kd
import voc
from conftest import REPO, assert_flag_refused, loop_config, small_run_args

COMPARED = ("train_loss", "val_loss", "val_miou", "val_pixel_acc", "lr")


def _args(data_dir, out, *extra):
    return small_run_args(data_dir, out, "--epochs", "2", "--limit-train", "64", "--lr", "1e-3", *extra)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    train_baseline.main(train_baseline.get_args_parser().parse_args(_args(data_dir, out)))
    return json.loads((out / "history.json").read_text())


def _start_and_signal(data_dir, out, sig, *extra, wrapper=()):
    """Start a run in its own process group (under `wrapper`, e.g. `timeout`, if given), send sig to the whole group
    (as `timeout`, SLURM or Ctrl-C do: loader workers and the wrapper included) once its log shows epoch 1 under way,
    wait for the exit. Returns (exit code, stdout and stderr together)."""
    proc = subprocess.Popen([*wrapper, sys.executable, "train_baseline.py", *_args(data_dir, out), "--log-every", "1",
                             *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    output = []
    reader = threading.Thread(target=lambda: output.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while not re.search(r"epoch 1 batch [1-6]/8 ", "".join(output)):
        assert proc.poll() is None and time.time() < deadline, "".join(output)[-2000:]
        time.sleep(0.01)
    os.killpg(proc.pid, sig)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    return proc.returncode, "".join(output)


def _resume_and_compare(data_dir, out, reference, *extra):
    train_baseline.main(train_baseline.get_args_parser().parse_args(_args(data_dir, out, "--resume", *extra)))
    history = json.loads((out / "history.json").read_text())
    assert len(history) == len(reference)
    for a, b in zip(history, reference):
        for key in COMPARED:
            assert a[key] == b[key], (a["epoch"], key)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_process_group_inside_an_epoch_saves_and_resumes_exactly(sig, data_dir, tmp_path, reference):
    out = tmp_path / "run"
    code, output = _start_and_signal(data_dir, out, sig, "--workers", "2")  # the workers get the signal too
    name = signal.Signals(sig).name
    assert code == 1 and f"interrupted by {name}" in output and "--resume" in output, output[-2000:]
    assert output.count(f"{name}: saving") == 1 and "DataLoader worker" not in output  # the workers ignored it
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["partial"]["epoch"] == 1 and 1 <= ckpt["partial"]["step"] < 8
    _resume_and_compare(data_dir, out, reference)


def test_signal_forwarded_by_a_wrapper_in_the_same_group_still_saves(data_dir, tmp_path, reference):
    """`timeout` (like srun-style launchers) passes on the SIGTERM the whole group got, so the run receives it twice
    within milliseconds (Python may run its handler once for both): either way a resumable checkpoint is saved and the
    run resumes exactly. The handler's rules for a repeat are tested without timing in test_data_path_faults.py."""
    out = tmp_path / "run"
    code, output = _start_and_signal(data_dir, out, signal.SIGTERM, "--workers", "2", wrapper=("timeout", "600"))
    assert "interrupted by SIGTERM: saved" in output and "exiting now" not in output, output[-2000:]
    assert "Traceback" not in output and "ConnectionResetError" not in output
    assert torch.load(out / "last.pth", weights_only=True)["partial"]["epoch"] == 1
    _resume_and_compare(data_dir, out, reference)


def test_signal_inside_an_epoch_on_the_device_path_resumes_exactly(data_dir, tmp_path):
    """--data-on-device on: the same exact mid-epoch resume (compared with that path's own uninterrupted run)."""
    on_device = ("--data-on-device", "on")
    straight = tmp_path / "straight"
    train_baseline.main(train_baseline.get_args_parser().parse_args(_args(data_dir, straight, *on_device)))
    out = tmp_path / "run"
    code, output = _start_and_signal(data_dir, out, signal.SIGTERM, *on_device)
    assert code == 1 and "interrupted by SIGTERM" in output and "training data: on the device" in output, output
    assert 1 <= torch.load(out / "last.pth", weights_only=True)["partial"]["step"] < 8
    _resume_and_compare(data_dir, out, json.loads((straight / "history.json").read_text()), *on_device)


def test_kill_9_keeps_a_complete_checkpoint_and_resumes(data_dir, tmp_path, reference):
    out = tmp_path / "run"
    code, _ = _start_and_signal(data_dir, out, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 0  # intact, loadable
    _resume_and_compare(data_dir, out, reference)


def _batches(n):
    return [{"image": torch.zeros(2, 1), "mask": torch.zeros(2, 1)} for _ in range(n)]


def test_non_finite_loss_stops_naming_batch_and_term_or_is_skipped():
    weight = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([weight], lr=0.1)

    def compute_loss(net, batch):
        compute_loss.calls += 1
        kd = weight * (float("nan") if compute_loss.calls == 2 else 1.0)
        ce = weight * 2
        return ce + kd, {"ce": ce, "kd": kd}
    compute_loss.calls = 0
    net = torch.nn.ParameterList([weight])
    with pytest.raises(errors.UserError, match=r"non-finite loss at epoch 3 batch 1 \(terms: kd\)"):
        engine.train_one_epoch(net, compute_loss, _batches(3), opt, None, engine.EpochProgress(3), loop_config())
    compute_loss.calls = 0
    weight.data.fill_(1.0)
    progress = engine.EpochProgress(3)
    with pytest.warns(UserWarning, match="non-finite loss at batch 1; its optimizer step is skipped"):
        engine.train_one_epoch(net, compute_loss, _batches(3), opt, None, progress, loop_config(skip_nonfinite=True))
    assert progress.step == 3 and progress.skipped == 1 and progress.images == 4
    # batches 0 and 2 trained (2 images each): kd = w = 1.0, then 1.0 - 0.1 * d(3w)/dw = 0.7
    assert progress.totals["kd"] == pytest.approx(2 * 1.0 + 2 * 0.7) and weight.item() == pytest.approx(0.4)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    engine.save_checkpoint({"epoch": 1}, str(path))

    def no_space(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(errors.UserError, match="no space left on the device writing .*last.pth.*intact"):
        engine.save_checkpoint({"epoch": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["last.pth"]


def test_truncated_jpeg_is_named(toy_root, tmp_path):
    import shutil
    root = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(toy_root, root)
    jpg = root / "JPEGImages" / "toy_val_0007.jpg"
    jpg.write_bytes(jpg.read_bytes()[:300])
    with pytest.raises(errors.UserError, match=r"toy_val_0007\.jpg"):
        voc.PixelCache(str(root), "val", str(tmp_path / "cache"))


def test_gradient_accumulation_equals_the_large_batch():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def run(batches, accumulate):
        model = torch.nn.Linear(3, 1)
        model.load_state_dict(reference_state)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def compute_loss(net, batch):
            mse = torch.nn.functional.mse_loss(net(batch["image"]), batch["mask"])
            return mse, {"mse": mse}
        engine.train_one_epoch(model, compute_loss, batches, opt, None, engine.EpochProgress(0),
                               loop_config(accumulate=accumulate))
        return model.weight.detach().clone()
    reference_state = torch.nn.Linear(3, 1).state_dict()
    big = run([{"image": x[:4], "mask": y[:4]}, {"image": x[4:], "mask": y[4:]}], accumulate=1)
    small = run([{"image": x[i:i + 2], "mask": y[i:i + 2]} for i in range(0, 8, 2)], accumulate=2)
    torch.testing.assert_close(small, big, rtol=1e-6, atol=1e-7)


def test_bad_dataset_folder_and_flags_are_one_line_errors(tmp_path, toy_root, capsys):
    proc = subprocess.run([sys.executable, "train_baseline.py", "--data-dir", str(tmp_path / "nowhere"),
                           "--no-download", "--no-pretrained", "--out-dir", str(tmp_path / "run")], cwd=REPO,
                          capture_output=True, text=True)
    last_line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last_line.startswith("error: no VOC dataset under --data-dir")
    assert not (tmp_path / "run").exists()  # a failed start leaves no run folder behind
    partial = tmp_path / "partial" / "VOCdevkit" / "VOC2012"  # a half-extracted dataset: no masks folder
    os.makedirs(partial / "JPEGImages")
    os.makedirs(partial / "ImageSets" / "Segmentation")
    with pytest.raises(errors.UserError, match="no VOC dataset under --data-dir"):
        train_baseline.main(train_baseline.get_args_parser().parse_args(
            ["--data-dir", str(tmp_path / "partial"), "--no-download", "--no-pretrained",
             "--out-dir", str(tmp_path / "run")]))
    for bad in (["--temperature", "0"], ["--temperature", "-2"], ["--accumulate", "0"]):
        assert_flag_refused(train_response_kd, ["--toy", *bad], capsys)
