"""compare.py: strategies x seeds with one recipe; killed half-way (SIGTERM to its process group) and run again it
finishes without retraining what was finished; the table's figures against the runs' own history.json; a --grid
sweep; a failing run reported in its row while the others go on; settings changed under a finished run refused."""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import common
import compare
import errors
import methods
from conftest import REPO


def compare_argv(data_dir, out, *extra):
    return ["--toy", "--data-dir", data_dir, "--out-dir", str(out), "--no-pretrained", "--image-size", "32",
            "--limit-train", "16", "--limit-val", "6", "--workers", "0", "--batch-size", "8", "--lr", "2e-3", *extra]


def history(run):
    return json.loads((run / "history.json").read_text())


def test_killed_comparison_finishes_when_run_again_without_retraining(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "compare.py", *compare_argv(data_dir, out, "--strategies", "baseline,response-kd",
                                                         "--seeds", "0,1", "--epochs", "2", "--teacher-epochs", "1")]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "teacher" / "config.json").exists():  # the comparison holds its folder's lock by then
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.05)
    with pytest.raises(errors.UserError, match=f"--out-dir {out} is in use by another run \\(pid {proc.pid}"):
        compare.main(compare.get_args_parser().parse_args(cmd[2:]))  # a second copy of the command, refused
    while not ((out / "baseline_seed1" / "history.json").exists() and (out / "baseline_seed0" / "best.pth").exists()):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # half-way: the teacher and baseline seed 0 finished, seed 1 in epoch 2
    assert proc.wait(timeout=60) == 1
    first = (tmp_path / "first.log").read_text()
    assert "run the same compare.py command again to finish the table" in first
    assert "plus --resume" not in first  # (the training script's advice; compare.py resumes by itself)
    assert not (out / "results.md").exists() and not (out / "response-kd_seed0").exists()
    assert len(history(out / "baseline_seed1")) == 1  # stopped inside its second epoch, saved where it stood
    kept = {name: (out / name / "last.pth").stat().st_mtime_ns for name in ("teacher", "baseline_seed0")}

    monkeypatch.setattr(common, "CLASS_WEIGHTS_SHOWN", set())  # as in a new process
    compare.main(compare.get_args_parser().parse_args(cmd[2:]))  # the same command again, in this process
    again = capsys.readouterr().out
    assert "5 runs, 2 already finished, 3 to train" in again
    assert again.count("class weights (") == 1  # once per comparison, not once per run
    assert "== run 1 of 3: baseline seed 1" in again and "resumed" in again
    assert kept == {name: (out / name / "last.pth").stat().st_mtime_ns for name in kept}  # never trained again

    results = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    final = {(name, s): history(out / f"{name}_seed{s}")[-1]["val_miou"] for name in rows for s in (0, 1)}
    for name, row in rows.items():
        assert row["miou_runs"] == [final[name, 0], final[name, 1]] and len(history(out / f"{name}_seed0")) == 2
        assert row["miou"] == pytest.approx(statistics.mean(row["miou_runs"]))
        assert row["miou_std"] == pytest.approx(statistics.stdev(row["miou_runs"]))
    diffs = [final["response-kd", s] - final["baseline", s] for s in (0, 1)]
    assert rows["response-kd"]["diff"] == pytest.approx(statistics.mean(diffs))
    assert rows["response-kd"]["diff_std"] == pytest.approx(statistics.stdev(diffs))
    assert rows["response-kd"]["diff_positive"] == sum(d > 0 for d in diffs)
    epoch_s = [h["epoch_s"] for s in (0, 1) for h in history(out / f"baseline_seed{s}")]
    assert rows["baseline"]["epoch_s"] == pytest.approx(statistics.median(epoch_s))
    assert results["teacher"]["miou"] == history(out / "teacher")[-1]["val_miou"]
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| model | params (M) | seeds | final val mIoU (mean +- std) | per seed | best epoch")
    assert [line.split(" | ")[0] for line in table[2:5]] == ["| teacher", "| baseline", "| response-kd"]
    assert f"{rows['response-kd']['diff']:+.2f} +- " in table[4]
    for name in ("summary.png", "miou_all.png"):
        assert Image.open(out / name).size[0] >= 500


def test_grid_rows_a_failed_run_and_changed_settings(data_dir, tmp_path):
    out = tmp_path / "cmp"
    broken = out / "response-kd_tau=4_seed0"
    broken.mkdir(parents=True)
    (broken / "last.pth").write_bytes(b"not a checkpoint")  # its run fails; the comparison goes on
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pth"
    torch.save(common.build_teacher(21, pretrained=False).state_dict(), teacher)  # a given teacher, evaluated once
    argv = compare_argv(data_dir, out, "--strategies", "baseline,response-kd", "--seeds", "0", "--epochs", "1",
                        "--grid", "response-kd:--tau=1,4", "--teacher-weights", str(teacher))
    with pytest.raises(errors.UserError, match=r"1 of 3 runs failed \(listed under the table in .*results.md\)"):
        compare.main(compare.get_args_parser().parse_args(argv))
    results = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    assert list(rows) == ["baseline", "response-kd tau=1", "response-kd tau=4"]
    assert rows["response-kd tau=1"]["overrides"] == {"tau": 1.0}
    assert json.loads((out / "response-kd_tau=1_seed0" / "config.json").read_text())["tau"] == 1.0
    assert rows["response-kd tau=1"]["seeds"] == 1 and rows["response-kd tau=4"]["seeds"] == 0
    one = rows["response-kd tau=1"]  # one seed: no spread reported, neither 0 nor a number
    assert one["miou_std"] is None and one["diff_std"] is None and one["diff"] == pytest.approx(
        one["miou_runs"][0] - rows["baseline"]["miou_runs"][0])
    table_row = next(line for line in (out / "results.md").read_text().splitlines()
                     if line.startswith("| response-kd tau=1 |"))
    assert f"| {one['miou']:.2f} |" in table_row and "+-" not in table_row
    assert results["failed"][0]["model"] == "response-kd tau=4"
    assert results["failed"][0]["error"].startswith(f"--resume {broken / 'last.pth'} is not a readable PyTorch ")
    assert "FAILED: response-kd tau=4 seed 0: --resume" in (out / "results.md").read_text()
    assert results["teacher"]["source"] == str(teacher) and 0 <= results["teacher"]["miou"] <= 100
    assert json.loads((out / "response-kd_tau=1_seed0" / "config.json").read_text())["teacher_weights"] == \
        str(teacher)

    # the same folders under another recipe: every finished run is refused, naming the flag, none is retrained; the
    # table of 2 finished runs stays, the all-failed one lands beside it
    evaluated_at = (out / "teacher_eval.json").stat().st_mtime_ns
    changed = [a if a != "2e-3" else "1e-3" for a in argv]
    with pytest.raises(errors.UserError, match="3 of 3 runs failed .*results.incomplete.md"):
        compare.main(compare.get_args_parser().parse_args(changed))
    assert json.loads((out / "results.json").read_text()) == results
    again = json.loads((out / "results.incomplete.json").read_text())
    assert any("was trained with other settings (--lr 0.002 -> 0.001)" in f["error"] for f in again["failed"])
    assert again["teacher"] == results["teacher"] and (out / "teacher_eval.json").stat().st_mtime_ns == evaluated_at

    # the same recipe but another teacher file under the same path: the distilled runs are refused, the baseline kept
    torch.manual_seed(1)
    torch.save(common.build_teacher(21, pretrained=False).state_dict(), teacher)
    with pytest.raises(errors.UserError, match="2 of 3 runs failed"):
        compare.main(compare.get_args_parser().parse_args(argv))
    third = json.loads((out / "results.incomplete.json").read_text())
    assert [f["model"] for f in third["failed"]] == ["response-kd tau=1", "response-kd tau=4"]
    assert all("was distilled from another" in f["error"] for f in third["failed"])
    assert third["rows"][0]["miou_runs"] == rows["baseline"]["miou_runs"]


@pytest.mark.parametrize("grid, message", [
    ("nothing:--lr=1", "expected STRATEGY:--FLAG=V1,V2"),
    ("cwd:--no-such-flag=1", "--no-such-flag is not a flag cwd can sweep"),
    ("cwd:--seed=1,2", "--seed is not a flag cwd can sweep"),
    ("dist:--tau=1,2", "--grid sweeps dist, which --strategies leaves out"),
    ("cwd:--tau=2,2.0", "--grid cwd:--tau=2,2.0: 2.0 repeats 2"),
    ("cwd:--teacher-weights=a.pth,b.pth", "--teacher-weights is the comparison's own flag"),
    ("cwd:--tau=1,x", r"--grid cwd:--tau=1,x: argument --tau: invalid float value: 'x'"),  # not cwd's usage, exit 2
    ("cwd:--no-teacher-cache=maybe", r"--no-teacher-cache is a switch; sweep it as --no-teacher-cache=0,1"),
    ("cwd:--no-teacher-cache=1,on", "on repeats 1")])
def test_bad_grid_is_one_line_before_any_work(grid, message, data_dir, tmp_path):
    args = compare.get_args_parser().parse_args(compare_argv(data_dir, tmp_path / "cmp", "--strategies",
                                                             "baseline,cwd", "--teacher-epochs", "1", "--grid", grid))
    with pytest.raises(errors.UserError, match=message):
        compare.main(args)
    assert not (tmp_path / "cmp").exists()


def test_seeds_outside_numpys_range_are_refused_and_a_swept_baseline_has_no_pairs(capsys):
    """--seeds -1 was accepted, then every run failed in numpy; a grid over the baseline left no plain baseline row
    and the summary crashed (TypeError) before writing any table."""
    for bad in ("-1", "0,4294967296"):
        with pytest.raises(SystemExit) as e:
            compare.get_args_parser().parse_args(["--seeds", bad])
        assert e.value.code == 2 and "--seeds: must be an integer in [0, 2^32)" in capsys.readouterr().err
    run = {"seed": 0, "status": "done", "history": [{"val_miou": 5.0, "val_pixel_acc": 80.0, "epoch_s": 1.0}]}
    row = compare.summarise_row(compare.Row("baseline lr=0.001", "baseline", (("lr", 1e-3),)), [run], None)
    assert row["miou"] == 5.0 and row["diff"] is None and row["diff_pairs"] == 0


def test_grid_takes_the_new_flag_names_and_the_old_ones_as_them(capsys):
    """A sweep of a renamed flag: the new name, or the old one (with its deprecation line), labelled and stored under
    the new name; every strategy the registry knows, and 'all'."""
    assert compare.parse_grid("mgd:--mgd-mask-ratio=0.5,0.9") == [
        compare.Row("mgd mgd-mask-ratio=0.5", "mgd", (("mgd_mask_ratio", 0.5),)),
        compare.Row("mgd mgd-mask-ratio=0.9", "mgd", (("mgd_mask_ratio", 0.9),))]
    assert compare.parse_grid("response-kd:--temperature=3") == [
        compare.Row("response-kd tau=3", "response-kd", (("tau", 3.0),))]
    assert "--temperature is deprecated" in capsys.readouterr().err
    # a switch (a flag that takes no value) as 0/1: given or not; a --x/--no-x pair as the one or the other
    assert compare.parse_grid("cwd:--no-teacher-cache=0,1") == [
        compare.Row("cwd no-teacher-cache=0", "cwd", (("no_teacher_cache", False),)),
        compare.Row("cwd no-teacher-cache=1", "cwd", (("no_teacher_cache", True),))]
    assert compare.parse_grid("baseline:--no-channels-last=on,off") == [
        compare.Row("baseline no-channels-last=on", "baseline", (("channels_last", False),)),
        compare.Row("baseline no-channels-last=off", "baseline", (("channels_last", True),))]
    assert compare.get_args_parser().parse_args(["--strategies", "all"]).strategies == list(methods.strategies())


@pytest.mark.parametrize("flags, message", [
    (["--teacher-weights", "nowhere.pth"], "--teacher-weights nowhere.pth: no such file"),
    (["--teacher-weights", __file__, "--teacher-epochs", "2"], "--teacher-weights and --teacher-epochs both given"),
    (["--scales", "0.25,1"], r"--scales 0.25 at --image-size 32 gives inputs under 16 px")])
def test_teacher_and_scale_flags_are_checked_before_any_work(flags, message, data_dir, tmp_path):
    args = compare.get_args_parser().parse_args(compare_argv(data_dir, tmp_path / "cmp", *flags))
    with pytest.raises(errors.UserError, match=message):
        compare.main(args)
    assert not (tmp_path / "cmp").exists()


def test_a_bug_in_one_run_is_reported_in_its_row_and_the_others_finish(data_dir, tmp_path, monkeypatch, capsys):
    def crash(args, context):
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(methods.registry()["cwd"], "build_loss", crash)
    teacher = tmp_path / "teacher.pth"
    torch.save(common.build_teacher(21, pretrained=False).state_dict(), teacher)
    out = tmp_path / "cmp"
    args = compare.get_args_parser().parse_args(compare_argv(data_dir, out, "--strategies", "baseline,cwd", "--seeds",
                                                             "0", "--epochs", "1", "--teacher-weights", str(teacher)))
    with pytest.raises(errors.UserError, match="1 of 2 runs failed"):
        compare.main(args)
    assert "Traceback" in capsys.readouterr().err  # a bug keeps its traceback on stderr
    results = json.loads((out / "results.json").read_text())
    assert results["failed"] == [{"model": "cwd", "seed": 0, "error": "RuntimeError: CUDA out of memory (simulated)"}]
    assert [r["seeds"] for r in results["rows"]] == [1, 0] and len(history(out / "baseline_seed0")) == 1


def test_a_moved_comparison_keeps_its_runs_and_a_worse_table_never_replaces_a_good_one(data_dir, tmp_path):
    """Issue 26 item 1: the teacher path recorded by its runs is compared as the file it names (its checksum), so
    the same comparison moved elsewhere or named by a relative path keeps every run; a rerun that finishes fewer runs
    than the table already holds writes its table beside it, never over it."""
    first = tmp_path / "first"
    argv = compare_argv(data_dir, first, "--strategies", "baseline,cwd", "--seeds", "0", "--epochs", "1",
                        "--teacher-epochs", "1")
    compare.main(compare.get_args_parser().parse_args(argv))
    good = (first / "results.md").read_text()
    moved = tmp_path / "elsewhere" / "moved"
    os.makedirs(moved.parent)
    shutil.move(first, moved)
    teacher = os.path.relpath(moved / "teacher" / "best.pth")  # relative now, absolute when the runs were made
    again = compare_argv(data_dir, os.path.relpath(moved), "--strategies", "baseline,cwd", "--seeds", "0",
                         "--epochs", "1", "--teacher-weights", teacher)
    rows = compare.main(compare.get_args_parser().parse_args(again))
    assert all(r["seeds"] == 1 for r in rows) and (moved / "results.md").read_text().count("FAILED") == 0
    assert [h["epoch"] for h in history(moved / "cwd_seed0")] == [0]  # kept, not retrained
    # the teacher replaced by another file: the distilled run fails; the good table stays, the new one lands beside
    torch.save({"model": common.Teacher(21).state_dict(), "arch": "teacher", "num_classes": 21}, teacher)
    with pytest.raises(errors.UserError, match="1 of 2 runs failed"):
        compare.main(compare.get_args_parser().parse_args(again))
    assert (moved / "results.md").read_text().count("FAILED") == 0
    assert "FAILED: cwd seed 0" in (moved / "results.incomplete.md").read_text()


@pytest.mark.parametrize("flags, message", [
    (["--strategies", "baseline,cwd", "--no-pretrained"], "give the distilled rows a teacher: --teacher-weights"),
    (["--strategies", "baseline"], "cannot load pretrained weights mobilenet_v3_large"),
])
def test_weights_every_run_needs_are_checked_before_any_training(flags, message, data_dir, tmp_path):
    """Issue 26 item 3: offline, a missing pretrained teacher (distilled rows with no teacher flag) or pretrained
    backbone (no --no-pretrained) stops the comparison before its first run, in one line, not after training."""
    argv = [a for a in compare_argv(data_dir, tmp_path / "cmp", *flags, "--seeds", "0", "--epochs", "1")
            if a != "--no-pretrained" or "--no-pretrained" in flags]
    with pytest.raises(errors.UserError, match=message) as e:
        compare.main(compare.get_args_parser().parse_args(argv))
    assert "\n" not in str(e.value) and not (tmp_path / "cmp" / "baseline_seed0").exists()


def test_a_damaged_history_is_one_line_naming_it(tmp_path, capsys):
    """Issue 26 item 6: a history.json that is not JSON, or JSON without an epoch's figures, is one line naming the
    file: compare.py fails that run alone (the others are kept), evaluate.py --comparison leaves it out of the plot."""
    import engine
    import evaluate
    good, edited, truncated = (tmp_path / name for name in ("good", "edited", "truncated"))
    record = {"epoch": 0, "train_loss": 1.0, "val_loss": 1.2, "val_miou": 5.0, "val_pixel_acc": 50.0, "epoch_s": 3.0}
    for folder, text in ((good, json.dumps([record])), (edited, json.dumps([{"epoch": 0, "val_miou": 5.0}])),
                         (truncated, json.dumps([record])[:20])):
        folder.mkdir()
        (folder / "history.json").write_text(text)
        (folder / "last.pth").write_bytes(b"")
        (folder / "config.json").write_text("{}")
    assert engine.read_history(str(good / "history.json")) == [record]
    with pytest.raises(errors.UserError, match=r"edited/history.json is not a run's history \(epoch record 0 lacks "
                                               r"train_loss, val_loss, val_pixel_acc, epoch_s\)"):
        compare.finished_history(argparse.Namespace(out_dir=str(edited), resume="", epochs=1))
    with pytest.raises(errors.UserError, match=r"truncated/history.json is unreadable"):
        compare.finished_history(argparse.Namespace(out_dir=str(truncated), resume="", epochs=1))
    assert compare.finished_history(argparse.Namespace(out_dir=str(good), resume="", epochs=1)) == [record]
    weights = [str(folder / "best.pth") for folder in (good, edited, truncated)]
    assert list(evaluate.run_histories(weights)) == weights[:1]
    err = capsys.readouterr().err
    assert err.count("warning:") == 2 and "edited/history.json" in err and "truncated/history.json" in err


def test_a_signal_during_the_final_evaluation_says_what_is_kept(data_dir, tmp_path, monkeypatch):
    """Issue 26 item 8: SIGINT while the finished runs are evaluated at --scales said "nothing half-built was kept,
    the next run builds it again" (the caches' wording); now what is kept and the command to finish."""
    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # (the handler raises in the main thread at once)
        raise AssertionError("SIGINT was not handled")
    out = tmp_path / "cmp"
    args = compare.get_args_parser().parse_args(compare_argv(data_dir, out, "--strategies", "baseline", "--seeds", "0",
                                                             "--epochs", "1", "--scales", "0.5,1"))
    monkeypatch.setattr(compare, "final_evaluation", interrupted)
    with pytest.raises(errors.Interrupted) as e:
        compare.main(args)
    assert str(e.value) == ("interrupted by SIGINT while evaluating the final models; every finished run and "
                            "evaluation is kept; run the same compare.py command again to finish the table")
    assert len(history(out / "baseline_seed0")) == 1 and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_plots_and_notes_of_short_failed_and_unlearnt_comparisons(tmp_path, monkeypatch):
    """Issue 26 items 9 and 10: miou_all.png of 2-epoch runs had an x axis from -1 to 1 (epoch 1 on its edge) and
    1-epoch runs drawn on one x; every run failed: an empty summary.png; models predicting one class everywhere: a
    table of identical figures that did not say why."""
    import matplotlib.figure
    import plots
    drawn = []
    save = matplotlib.figure.Figure.savefig
    def record(fig, path, **kwargs):
        lines = fig.axes[0].lines
        drawn.append((os.path.basename(path), fig.axes[0].get_xlim(), [list(line.get_xdata()) for line in lines]))
        return save(fig, path, **kwargs)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    epoch = {"train_loss": 1.0, "val_loss": 1.0, "val_miou": 5.0, "val_pixel_acc": 50.0, "epoch_s": 1.0}
    for epochs, limits in ((2, (-1, 2)), (1, (-1, 1))):
        runs = {f"run {i}": [dict(epoch, epoch=e) for e in range(epochs)] for i in range(3)}
        plots.plot_runs_miou(runs, str(tmp_path / "miou_all.png"))
        name, xlim, xs = drawn.pop()
        assert xlim == limits and len({x[-1] for x in xs}) == 3  # every epoch inside, each run's point its own x
        assert all(abs(x - e) <= plots.DODGE / 2 for line in xs for e, x in enumerate(line))

    args = compare.get_args_parser().parse_args(["--out-dir", str(tmp_path / "cmp"), "--seeds", "0,1"])
    os.makedirs(args.out_dir)
    def summary(outcomes):
        runs = [dict(outcome, label="baseline", seed=s) for s, outcome in enumerate(outcomes)]
        row = compare.summarise_row(compare.Row("baseline", "baseline"), runs, runs)
        return [dict(row, params_m=3.3)], [r for r in runs if r["status"] == "failed"]
    failed = {"status": "failed", "error": "out of memory"}
    rows, failed_runs = summary([failed, failed])
    compare.write_results(args, rows, None, failed_runs, "CPU")
    assert (tmp_path / "cmp" / "results.md").exists() and not (tmp_path / "cmp" / "summary.png").exists()
    unlearnt = {"status": "done", "history": [dict(epoch, epoch=0, val_classes_predicted=1)]}
    learnt = {"status": "done", "history": [dict(epoch, epoch=0, val_classes_predicted=4)]}
    rows, _ = summary([unlearnt, learnt])
    compare.write_results(args, rows, None, [], "CPU")
    assert rows[0]["one_class_seeds"] == [0]
    assert "NOTE: these models predict one class everywhere on val after their last epoch, so their figures say " \
           "nothing about the strategy: baseline (seed 0). The recipe has not learnt: raise --lr" in \
           (tmp_path / "cmp" / "results.md").read_text()
    assert {name for name, _, _ in drawn} == {"miou_all.png", "summary.png"}
