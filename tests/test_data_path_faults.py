"""Faults on the data path: a loader worker's error ends the run (one line, no hang, no orphan workers); runs started
together share every cache; a damaged cache is named and rebuilt (or, read-only, says how); evaluate.py's outputs under
torchrun; every error's advice is a command this repo accepts; repeated stop signals from a forwarding wrapper; output
paths that cannot be written are refused before any work."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import distill
import engine
import errors
import evaluate
import fileio
import methods
import train_baseline
import voc
from conftest import REPO, small_run_args


def process_gone(pid):
    """True if pid has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


# --- 1. an error inside a loader worker ends the run -----------------------------------------------------------------

WORKER_ERROR_RUN = """
import os, sys
sys.path.insert(0, {repo!r})
from torch.utils.data import dataloader
import errors, train_baseline, voc
main_pid, get, start = os.getpid(), voc.PixelCache.get, dataloader._MultiProcessingDataLoaderIter.__init__
def failing_get(self, i):
    if os.getpid() != main_pid and self.dir.endswith("-train") and i % 4 == 3:
        raise {error}
    return get(self, i)
def recording_start(self, loader):  # the workers' pids, as the main process starts them
    start(self, loader)
    with open({pids!r}, "a") as f:
        f.write("".join(f"{{w.pid}}\\n" for w in self._workers))
voc.PixelCache.get = failing_get
dataloader._MultiProcessingDataLoaderIter.__init__ = recording_start
errors.main_entry(train_baseline.main, train_baseline.get_args_parser, {argv!r})
"""


@pytest.mark.parametrize("error", [
    'voc.DataProblem(f"cannot read image /data/JPEGImages/{i}.jpg (truncated); replace it")',
    'ValueError("a bug, not a data problem")'])
def test_worker_error_ends_the_run_within_seconds_and_leaves_no_worker(error, data_dir, tmp_path):
    pids = tmp_path / "worker_pids"
    argv = small_run_args(data_dir, tmp_path / "run", "--epochs", "1", "--image-size", "32", "--workers", "2")
    code = WORKER_ERROR_RUN.format(repo=REPO, pids=str(pids), error=error, argv=argv)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-2000:]
    if "DataProblem" in error:  # the one line naming the file, not the worker's traceback
        last = proc.stderr.strip().splitlines()[-1]
        assert re.fullmatch(r"error: cannot read image /data/JPEGImages/\d+\.jpg \(truncated\); replace it", last)
        assert "Traceback" not in proc.stderr
    else:
        assert "ValueError: a bug, not a data problem" in proc.stderr
    workers = {int(p) for p in pids.read_text().split()}
    assert len(workers) == 2
    deadline = time.time() + 10
    while not all(process_gone(p) for p in workers):
        assert time.time() < deadline, [p for p in workers if not process_gone(p)]
        time.sleep(0.1)


# --- 2. several runs build the same caches at once -------------------------------------------------------------------

BUILD_CACHES = """
import sys
sys.path.insert(0, {repo!r})
import torch, common, distill, train_response_kd
data = common.data_config(train_response_kd.get_args_parser().parse_args({argv!r}))
train = common.build_datasets(data, splits=("train",))["train"]
common.compute_class_weights(train)
torch.manual_seed(0)
teacher = common.build_teacher(21, pretrained=False).eval()
distill.TeacherLogitCache(teacher, train, torch.device("cpu"), 8, 0, "fp32")
"""

CACHE_FILES = ("index.json", "images.npy", "masks.npy", "class_weights.json", "teacher_logits.npy")


def cache_contents(cache_dir):
    """{file: bytes} of the train split's caches."""
    (folder,) = [d for d in os.listdir(cache_dir) if d.endswith("-train")]
    return {name: open(os.path.join(cache_dir, folder, name), "rb").read() for name in CACHE_FILES}


def test_runs_started_together_share_every_cache(tmp_path, copies=3):  # (3 racing covers 2; the suite's time)
    def argv(data, cache):
        return ["--toy", "--data-dir", str(data), "--cache-dir", str(cache), "--image-size", "32",
                "--limit-train", "24"]

    def start(data, cache):
        return subprocess.Popen([sys.executable, "-c", BUILD_CACHES.format(repo=REPO, argv=argv(data, cache))],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    together = [start(tmp_path / "data", tmp_path / "cache") for _ in range(copies)]
    results = [(p.wait(timeout=240), p.stderr.read()) for p in together]
    assert all(code == 0 for code, _ in results), [err[-1500:] for _, err in results]
    exec(BUILD_CACHES.format(repo=REPO, argv=argv(tmp_path / "data", tmp_path / "cache_alone")), {})  # alone
    shared, single = cache_contents(tmp_path / "cache"), cache_contents(tmp_path / "cache_alone")
    for name in CACHE_FILES:
        assert shared[name] == single[name], name
    leftovers = [f for d in (tmp_path / "cache").iterdir() for f in os.listdir(d) if ".tmp" in f]
    assert not leftovers and not [d for d in os.listdir(tmp_path / "data") if ".tmp" in d]


# --- 3. a damaged cache is named and rebuilt -------------------------------------------------------------------------

def truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def flip_last_bytes(path, value=200):
    """Same-size damage: the last 64 bytes overwritten (a mask byte out of range, or wrong pixels/logits)."""
    with open(path, "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(bytes([value]) * 64)


DAMAGE = {
    "truncated images": ("images.npy", truncate, "images.npy has"),
    "deleted images": ("images.npy", os.remove, "images.npy: No such file"),
    "garbage index": ("index.json", lambda p: open(p, "w").write("{not json"), "index.json is unreadable"),
    "mask bytes out of range, same size": ("masks.npy", flip_last_bytes, "masks.npy fails its checksum"),
    "pixels overwritten, same size": ("images.npy", lambda p: flip_last_bytes(p, 7), "images.npy fails its checksum"),
}


@pytest.fixture(scope="module")
def built_cache(toy_root, tmp_path_factory):
    """The toy val split's pixel cache, built once: (cache_dir, {file: bytes})."""
    cache_dir = tmp_path_factory.mktemp("pristine")
    cache = voc.PixelCache(toy_root, "val", str(cache_dir))
    return cache_dir, {n: open(os.path.join(cache.dir, n), "rb").read() for n in ("images.npy", "masks.npy")}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_pixel_cache_is_named_and_rebuilt(kind, toy_root, built_cache, tmp_path, capsys):
    import shutil
    pristine_dir, pristine = built_cache
    shutil.copytree(pristine_dir, tmp_path / "cache")
    (folder,) = os.listdir(tmp_path / "cache")
    name, damage, reason = DAMAGE[kind]
    damage(str(tmp_path / "cache" / folder / name))
    cache = voc.PixelCache(toy_root, "val", str(tmp_path / "cache"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and reason in err[0]
    assert err[0].startswith(f"warning: the pixel cache {cache.dir} is damaged (")
    assert err[0].endswith("; rebuilding it")
    for n, content in pristine.items():
        assert open(os.path.join(cache.dir, n), "rb").read() == content
    voc.PixelCache(toy_root, "val", str(tmp_path / "cache"))  # intact now: opened without a word
    assert capsys.readouterr().err == ""


def test_damaged_class_weights_and_teacher_logits_are_rebuilt(toy_root, tmp_path, capsys):
    dataset = common.SegmentationDataset(voc.PixelCache(toy_root, "train", str(tmp_path)), 32, train=True,
                                         limit=8)
    weights = common.compute_class_weights(dataset)
    torch.manual_seed(0)
    teacher = common.build_teacher(21, pretrained=False).eval()
    cache = distill.TeacherLogitCache(teacher, dataset, torch.device("cpu"), 4, 0, "fp32")
    logits = open(cache.path, "rb").read()
    capsys.readouterr()
    path = os.path.join(dataset.cache.dir, "class_weights.json")
    saved = json.load(open(path))
    saved["weights"][3] = 99.0  # an edit the checksum catches
    json.dump(saved, open(path, "w"))
    flip_last_bytes(cache.path)
    assert torch.equal(common.compute_class_weights(dataset), weights)
    distill.TeacherLogitCache(teacher, dataset, torch.device("cpu"), 4, 0, "fp32")
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"warning: {path} fails its checksum; recomputing the class weights",
                   f"warning: the teacher-logit cache {cache.path} is damaged (teacher_logits.npy fails its checksum); "
                   f"rebuilding it"]
    assert open(cache.path, "rb").read() == logits


@contextlib.contextmanager
def read_only_mount(path):
    """path (a folder) bind-mounted read-only onto itself; skips where the platform does not allow mounts."""
    bind = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({bind.stderr.strip()}); as root, chmod alone does not stop writes")
    try:
        ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True, text=True)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount read-only here ({ro.stderr.strip()})")
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_damaged_cache_in_a_read_only_folder_says_how_to_rebuild(toy_root, built_cache, tmp_path):
    import shutil
    shutil.copytree(built_cache[0], tmp_path / "cache")
    (folder,) = os.listdir(tmp_path / "cache")
    flip_last_bytes(str(tmp_path / "cache" / folder / "masks.npy"))
    with read_only_mount(tmp_path / "cache"):
        with pytest.raises(errors.UserError) as e:
            voc.PixelCache(toy_root, "val", str(tmp_path / "cache"))
    message = str(e.value)
    assert message.startswith(f"the pixel cache {tmp_path / 'cache' / folder} is damaged (masks.npy fails "
                              f"its checksum), and it cannot be rebuilt in place (Read-only file system); point "
                              f"--cache-dir")
    assert "\n" not in message


# --- 4. evaluate.py under torchrun -----------------------------------------------------------------------------------

def test_evaluate_under_torchrun_writes_what_one_process_writes(data_dir, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "student.pth"
    torch.save({"model": common.build_student(21, pretrained=False).state_dict()}, weights)

    def argv(out):
        return ["--weights", str(weights), "--toy", "--data-dir", data_dir, "--limit-val", "10", "--image-size", "32",
                "--workers", "0", "--batch-size", "2", "--json", str(out / "m.json"), "--save-vis", str(out / "vis"),
                "--num-vis", "4", "--html", str(out / "html"), "--save-predictions", str(out / "pred"),
                "--analysis", str(out / "analysis")]
    evaluate.main(evaluate.get_args_parser().parse_args(argv(tmp_path / "one")))  # one process: this one
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "evaluate.py"]
    two = subprocess.run(launch + argv(tmp_path / "two"), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]  # torchrun exits 0 only if both ranks did
    assert two.stdout.count("most confused") == 1 and two.stdout.count("wrote 10 predictions") == 1  # rank 0 alone
    one, two = tmp_path / "one", tmp_path / "two"
    reports = [json.loads((d / "m.json").read_text()) for d in (one, two)]
    assert reports[0].pop("seconds") > 0 and reports[1].pop("seconds") > 0  # the only field that may differ
    assert reports[0] == reports[1]
    for sub in ("vis", "html", "html/img", "pred", "analysis"):
        assert sorted(os.listdir(tmp_path / "one" / sub)) == sorted(os.listdir(tmp_path / "two" / sub)), sub
    for name in os.listdir(tmp_path / "one" / "pred"):
        assert (tmp_path / "one" / "pred" / name).read_bytes() == (tmp_path / "two" / "pred" / name).read_bytes()
    assert (one / "html" / "index.html").read_text() == (two / "html" / "index.html").read_text()


# --- 5. every error's advice is a command the repo accepts -----------------------------------------------------------

def run_baseline(argv):
    return train_baseline.main(train_baseline.get_args_parser().parse_args(argv))


def suggested_init_weights(message):
    (path,) = re.findall(r"--init-weights (\S+?)[;,)]?(?: |$)", message)
    return path


def test_every_suggestion_in_a_resume_error_is_accepted(data_dir, tmp_path):
    run = tmp_path / "run"
    args = small_run_args(data_dir, run, "--epochs", "1", "--image-size", "32")
    run_baseline(args)
    # a weights-only file given to --resume: told it holds no training state, pointed at --init-weights
    with pytest.raises(errors.UserError) as e:
        run_baseline(small_run_args(data_dir, run, "--epochs", "2", "--image-size", "32", "--resume",
                                    str(run / "best.pth")))
    assert "holds weights only, no training state" in str(e.value)
    path = suggested_init_weights(str(e.value))
    assert path == str(run / "best.pth")
    history = run_baseline(small_run_args(data_dir, tmp_path / "new", "--epochs", "1", "--image-size", "32",
                                          "--init-weights", path))
    assert len(history) == 1
    # a truncated last.pth: the advice names a file of the run that --init-weights accepts
    truncate(str(run / "last.pth"))
    with pytest.raises(errors.UserError) as e:
        run_baseline(args + ["--epochs", "2", "--resume"])
    message = str(e.value)
    assert "not a readable PyTorch checkpoint" in message and "--init-weights PATH" in message
    for name in re.findall(r"\b(best\.pth|epoch_NNN\.pth)", message):
        if name == "best.pth":
            run_baseline(small_run_args(data_dir, tmp_path / "from_best", "--epochs", "1", "--image-size", "32",
                                        "--init-weights", str(run / name)))
    # --init-weights starts from those weights: before any step, the network equals the file's
    loaded = common.load_model(str(run / "best.pth")).model
    student = engine.load_initial_weights(common.build_student(21, pretrained=False), str(run / "best.pth"))
    for k, v in loaded.state_dict().items():
        assert torch.equal(student.state_dict()[k], v), k


def test_every_suggestion_after_a_non_finite_loss_is_accepted(data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = small_run_args(data_dir, run, "--image-size", "32", "--lr", "1e-3")
    run_baseline(args + ["--epochs", "1"])
    baseline = methods.registry()["baseline"]
    make = baseline.build_loss

    def nan_in_epoch_1_batch_2(args, context):
        compute = make(args, context).compute_loss

        def compute_loss(net, batch):
            loss, terms = compute(net, batch)
            compute_loss.calls += 1
            return (loss * float("nan"), terms) if compute_loss.calls == 3 else (loss, terms)
        compute_loss.calls = 0
        return methods.Loss(compute_loss)
    monkeypatch.setattr(baseline, "build_loss", nan_in_epoch_1_batch_2)
    with pytest.raises(errors.UserError) as e:
        run_baseline(args + ["--epochs", "2", "--resume"])
    message = str(e.value)
    assert "non-finite loss at epoch 1 batch 2" in message
    assert "the same command plus --resume --skip-nonfinite" in message
    history = run_baseline(args + ["--epochs", "2", "--resume", "--skip-nonfinite"])  # the NaN batch is skipped
    assert [h["epoch"] for h in history] == [0, 1] and history[1]["skipped_steps"] == 1
    monkeypatch.undo()
    path = suggested_init_weights(message)
    run_baseline(small_run_args(data_dir, tmp_path / "new", "--image-size", "32", "--epochs", "1", "--lr", "5e-4",
                                "--init-weights", path))


# --- 6. repeated stop signals ----------------------------------------------------------------------------------------

def test_repeated_signals_within_the_window_or_while_saving_do_not_abandon_the_save(monkeypatch, capsys):
    clock, exits = [100.0], []
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    stop = engine.StopRequest()
    stop._handle(signal.SIGTERM, None)
    clock[0] += 0.01
    stop._handle(signal.SIGTERM, None)  # a forwarding wrapper's copy
    clock[0] += engine.StopRequest.REPEAT_WINDOW_S - 0.02
    stop._handle(signal.SIGINT, None)
    assert exits == [] and stop.signal == "SIGTERM"
    clock[0] += 60
    with stop.saving():
        stop._handle(signal.SIGTERM, None)  # however late: the checkpoint being written is finished
    assert exits == []
    stop._handle(signal.SIGTERM, None)  # deliberate, later, not while saving: exit now
    assert exits == [128 + signal.SIGTERM]
    err = capsys.readouterr().err
    assert err.count("still saving") == 3 and "writing the checkpoint, still saving" in err
    assert "exiting now; the last complete checkpoint is kept" in err


# --- 7. output paths that cannot be written --------------------------------------------------------------------------

def test_unwritable_out_dir_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    data = tmp_path / "data"  # stays empty: the refusal comes before the toy set or any model is made
    cases = {str(blocker / "run"): f": {blocker} is a file, not a folder",
             str(blocker): " is a file, not a folder"}
    for out, expected in cases.items():
        proc = subprocess.run([sys.executable, "train_baseline.py", "--toy", "--data-dir", str(data), "--no-pretrained",
                               "--out-dir", out], cwd=REPO, capture_output=True, text=True, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: --out-dir {out}")
        assert expected in lines[0] and not data.exists()
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only_mount(ro):
        for out, expected in ((ro, "cannot write to it (Read-only file system)"),
                              (ro / "new" / "run", "cannot create it (Read-only file system")):
            with pytest.raises(errors.UserError) as e:
                run_baseline(["--toy", "--data-dir", str(data), "--no-pretrained", "--out-dir", str(out)])
            assert str(e.value).startswith(f"--out-dir {out}: {expected}") and not data.exists()
        with pytest.raises(errors.UserError, match="--json .*m.json: cannot write to its folder \\(Read-only file"):
            evaluate.main(evaluate.get_args_parser().parse_args(["--weights", "x.pth", "--json", str(ro / "m.json")]))
        with pytest.raises(errors.UserError, match="--html .*: cannot create it \\(Read-only file system\\)"):
            evaluate.main(evaluate.get_args_parser().parse_args(["--weights", "x.pth", "--html", str(ro / "h")]))
    assert sorted(os.listdir(tmp_path)) == ["a_file", "ro"]  # the probes left nothing


def test_check_output_dir_creates_nothing_that_stays(tmp_path):
    fileio.check_output_dir(str(tmp_path / "a" / "b" / "c"), "--out-dir")
    assert os.listdir(tmp_path) == []
    fileio.check_output_dir(str(tmp_path), "--out-dir")
    fileio.check_output_file(str(tmp_path / "a" / "m.json"), "--json")
    assert os.listdir(tmp_path) == []
    fileio.write_json(str(tmp_path / "a" / "m.json"), {"miou": 1.0})  # the writer makes the folder it was checked for
    assert json.loads((tmp_path / "a" / "m.json").read_text()) == {"miou": 1.0}
    # another process (a torchrun rank) makes the folder between the check's look and its mkdir: no error, and the
    # folder, not the check's to remove, stays
    real_mkdir = os.mkdir

    def racing_mkdir(path, *a):
        real_mkdir(path, *a)
        raise FileExistsError(path)
    os.mkdir = racing_mkdir
    try:
        fileio.check_output_dir(str(tmp_path / "c"), "--out-dir")
    finally:
        os.mkdir = real_mkdir
    assert (tmp_path / "c").is_dir() and os.listdir(tmp_path / "c") == []
