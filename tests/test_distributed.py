"""torchrun: 2 CPU processes (gloo, DistributedDataParallel) train the baseline and every distillation method (the
latter with --data-on-device on; the teacher-logit cache built by rank 0; return_features and the methods' own
modules through DDP) for 1 epoch; rank 0 alone writes and logs, and the all-reduced val mIoU equals a 1-process
evaluation of the saved weights; the baseline then resumes under torchrun. Each rank's share of an epoch is the same on
both data paths."""
import json
import os
import subprocess
import sys

import pytest
import torch

import common
import engine
import evaluate
import methods
from conftest import REPO, loop_config, small_run_args

OUTPUTS = ["best.pth", "config.json", "history.json", "last.pth", "loss.png", "miou.png"]


def assert_equals_one_process_evaluation(out, data_dir, report, limit_val=6):
    """The run's all-reduced val mIoU (and pixel accuracy) of its best epoch is that of its saved best.pth evaluated
    in one process."""
    record = json.loads((out / "history.json").read_text())[torch.load(out / "best.pth", weights_only=True)["epoch"]]
    assert record["train_img_s"] > 0
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--weights", str(out / "best.pth"), "--toy", "--data-dir", data_dir, "--limit-val", str(limit_val),
         "--workers", "0", "--json", str(report)]))
    single = json.loads(report.read_text())
    assert single["num_images"] == limit_val
    assert record["val_miou"] == single["miou"] and record["val_pixel_acc"] == single["pixel_acc"]


EVERY_METHOD_UNDER_TORCHRUN = """
import argparse, atexit, sys
sys.path.insert(0, {repo!r})
import errors, methods
atexit.register(print, "python's teardown ran")  # it must not: errors.main_entry ends a torchrun process before


def main(args):  # run after run in the same 2 processes, each as its script's main runs it
    for name, argv in {runs!r}:
        method = methods.registry()[name]
        methods.main(method, methods.get_args_parser(method).parse_args(argv))


errors.main_entry(main, argparse.ArgumentParser)
"""


def test_torchrun_two_processes_every_method_and_a_resume(data_dir, tmp_path):
    """One torchrun launch (one, not one per case: the suite's time) trains the baseline for an epoch on the loader
    path, every distillation method for an epoch with the split on the device, then resumes the baseline to a second
    epoch: rank 0 alone logs and writes, and each run's val mIoU is a 1-process evaluation's."""
    names = [name for name, m in methods.registry().items() if m.TEACHER != "none"]
    teacher = tmp_path / "teacher.pth"
    torch.manual_seed(0)
    torch.save({"model": common.Teacher(21).state_dict(), "arch": "teacher", "num_classes": 21}, teacher)
    small = ["--lr", "1e-3", "--epochs", "1", "--image-size", "32", "--limit-train", "16", "--limit-val", "6"]
    baseline = small_run_args(data_dir, tmp_path / "baseline", *small)
    runs = [("baseline", baseline)] + [
        (name, small_run_args(data_dir, tmp_path / name, *small, "--teacher-weights", str(teacher),
                              "--data-on-device", "on")) for name in names] + [
        ("baseline", [*baseline, "--epochs", "2", "--resume"])]  # (the later --epochs counts)
    script = tmp_path / "every_method.py"
    script.write_text(EVERY_METHOD_UNDER_TORCHRUN.format(repo=REPO, runs=runs))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(launch, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "python's teardown ran" not in out  # ended by errors.main_entry with status 0, its output flushed
    assert out.count("epoch   0 | train loss") == 1 + len(names) == out.count("done: best val mIoU") - 1
    assert out.count("x 2 process(es)") == len(runs) and out.count("resumed") == 1
    assert out.count("epoch   1 | train loss") == 1 and "training data: on the device" in out
    for name in ["baseline", *names]:
        assert sorted(os.listdir(tmp_path / name)) == OUTPUTS, name
        assert_equals_one_process_evaluation(tmp_path / name, data_dir, tmp_path / f"{name}.json")
    history = json.loads((tmp_path / "baseline" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1] and sorted(os.listdir(tmp_path / "baseline")) == OUTPUTS
    assert torch.load(tmp_path / "baseline" / "last.pth", weights_only=True)["epoch"] == 1


END_UNDER_TORCHRUN = """
import argparse, atexit, sys
sys.path.insert(0, {repo!r})
import torch, torch.distributed as dist
import distributed, errors
atexit.register(print, "python's teardown ran")


def main(args):
    distributed.init_distributed("cpu")
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    ddp(torch.ones(3, 4)).sum().backward()  # DDP's all-reduce: its work holds Python objects
    dist.barrier()
    print(f"rank {{distributed.rank()}} done\\n", end="")  # one write: both ranks share the pipe
    if args.fail:
        raise errors.UserError("--fail given")


parser = argparse.ArgumentParser()
parser.add_argument("--fail", action="store_true")
errors.main_entry(main, lambda: parser)
"""


def test_a_failing_torchrun_process_ends_in_main_entry_without_pythons_teardown(tmp_path):
    """CI saw a rank abort after its work was done: a gloo thread released the last collective's Python objects while
    the interpreter finalized ("terminate called without an active exception", SIGABRT; a few runs in a hundred), and
    torchrun reported the run failed. So under torchrun errors.main_entry ends the process itself (output flushed, the
    group left) before that teardown: here with status 1 and the one-line error; with status 0 in the every-method
    launch above (which registers the same teardown marker)."""
    script = tmp_path / "end.py"
    script.write_text(END_UNDER_TORCHRUN.format(repo=REPO))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(launch + ["--fail"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert sorted(proc.stdout.splitlines()) == ["rank 0 done", "rank 1 done"]  # flushed; teardown never ran
    assert proc.stderr.count("error: --fail given") == 2


def test_each_rank_takes_the_same_share_on_both_data_paths(data_dir, tmp_path, monkeypatch):
    """Two ranks' batches of an epoch (and of its tail, resumed inside it): disjoint, together the whole epoch, and
    the same images on the device path as on the loader path."""
    cfg = common.DataConfig(data_dir=data_dir, toy=True, download=False, cache_dir=str(tmp_path), num_classes=21,
                            image_size=32, eval_size=None, limit_train=36, limit_val=None, train_set="train",
                            workers=0, seed=1)
    dataset = common.build_datasets(cfg, splits=("train",))["train"]
    monkeypatch.setattr(engine, "world_size", lambda: 2)
    shares = {}
    for mode in ("on", "off"):
        batches = engine.TrainBatches(dataset, loop_config(data=cfg, batch_size=4, data_on_device=mode))
        for r in (0, 1):
            monkeypatch.setattr(engine, "rank", lambda: r)
            shares[mode, r] = [b["index"].tolist() for b in batches.for_epoch(2)]
            assert [b["index"].tolist() for b in batches.for_epoch(2, skip_batches=1)] == shares[mode, r][1:]
    assert shares["on", 0] == shares["off", 0] and shares["on", 1] == shares["off", 1]
    first, second = (sum(shares["on", r], []) for r in (0, 1))
    assert len(first) == len(second) == 16 and not set(first) & set(second)  # 36 images: 4 whole rounds of 2 x 4
