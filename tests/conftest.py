import dataclasses
import gc
import os
import sys
import tempfile

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
VOC_SAMPLE = os.path.join(REPO, "..", "shared", "voc_sample")

import common  # noqa: E402
import engine  # noqa: E402
import toy_voc  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest.ini's -n 2: two test processes share the cores, so one thread
    os.environ["OMP_NUM_THREADS"] = "1"   # each (here and in the scripts they start); OpenMP threads of two processes
    torch.set_num_threads(1)              # spinning on the same 2 cores made the suite twice as slow, not faster


# the files whose tests run longest (torchrun, subprocesses, whole comparisons), longest first: with pytest.ini's
# -n 2 they start first, so the suite ends on short tests and neither process waits for the other's long one
LONG_FIRST = ("test_distributed.py", "test_demo.py", "test_data_path_faults.py", "test_faults.py", "test_compare.py",
              "test_timing.py", "test_distillation.py", "test_train_eval.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: each file's order kept


@pytest.fixture(scope="session", autouse=True)
def user_cache_dir(tmp_path_factory):
    """The default --cache-dir ($XDG_CACHE_HOME/voc-kd) inside pytest's temporary folder, for this process and the
    scripts the tests start: the suite never writes to the developer's ~/.cache."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield os.environ["XDG_CACHE_HOME"]
    if old is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session", autouse=True)
def scratch_inside_pytest_tmp(tmp_path_factory):
    """TMPDIR (torchrun's torchelastic_* log folders, any tempfile) and Inductor's cache (torch.compile) inside pytest's
    temporary folder, for this process and the scripts the tests start, so the suite leaves nothing in /tmp."""
    names = ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR")
    old = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ[name] = str(tmp_path_factory.mktemp(name.lower()))
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    yield
    for name, value in old.items():
        if value is None:
            del os.environ[name]
        else:
            os.environ[name] = value
    tempfile.tempdir = None


def live_children(pid):
    """Processes whose parent is pid and that are still running (zombies waiting to be reaped do not count)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            except OSError:  # gone meanwhile
                continue
            if int(ppid) == pid and state not in ("Z", "X"):
                found.append(int(entry))
    return found


def command_line(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:300]
    except OSError:
        return "(gone)"


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """After the whole suite: no process a test started (a script, a loader worker, torchrun) is still running."""
    yield
    if os.path.isdir("/proc"):
        gc.collect()  # a loader iterator kept alive only by a reference cycle (a test's traceback) ends its workers
        left = live_children(os.getpid())
        assert not left, f"processes left behind by the tests: {[(p, command_line(p)) for p in left]}"


@pytest.fixture
def compile_workers_stopped():
    """torch.compile's Inductor keeps a pool of compile-worker processes until the interpreter exits when the machine
    has many cores (the 16-core GPU machine; not 2 cores): stop it after the test, as a script's exit does."""
    yield
    from torch._inductor import async_compile
    async_compile.shutdown_compile_workers()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A data dir holding the generated toy set (made once per test session)."""
    d = tmp_path_factory.mktemp("data")
    toy_voc.make_toy_voc(os.path.join(d, "toy"))
    return str(d)


@pytest.fixture(scope="session")
def toy_root(data_dir):
    return os.path.join(data_dir, "toy", "VOCdevkit", "VOC2012")


@pytest.fixture(autouse=True)
def offline_torch_home(tmp_path, monkeypatch):
    """Every test gets an empty TORCH_HOME so nothing reads weights a developer has cached."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def small_run_args(data_dir, out_dir, *extra):
    """CLI flags for a seconds-long training run on the toy set."""
    return ["--toy", "--data-dir", data_dir, "--out-dir", str(out_dir), "--image-size", "64", "--batch-size", "8",
            "--limit-train", "32", "--limit-val", "12", "--workers", "0", "--no-pretrained", *extra]


def assert_flag_refused(module, argv, capsys):
    """module's argument parser rejects argv (ending in a flag and its bad value) with exit code 2, naming the flag."""
    with pytest.raises(SystemExit) as e:
        module.get_args_parser().parse_args(argv)
    assert e.value.code == 2 and argv[-2] in capsys.readouterr().err


def loop_config(**changes):
    """A TrainConfig for calling the loop's pieces (train_one_epoch, make_checkpoint) directly: CPU, fp32, toy-sized;
    `changes` replace any field (e.g. data=toy_data_config(tmp_path), precision="fp16")."""
    cfg = engine.TrainConfig(strategy="test", device=torch.device("cpu"), data=None, out_dir="", resume=None, epochs=1,
                             batch_size=2, lr=0.1, weight_decay=0.0, lr_factor=0.5, lr_patience=5, save_every=1,
                             precision="fp32", accumulate=1, channels_last=False, data_on_device="off", compile=False,
                             sync_bn=False, skip_nonfinite=False, log_every=20, flags={})
    return dataclasses.replace(cfg, **changes)


def toy_data_config(folder):
    """A DataConfig of the toy set under folder at 32 px, no workers."""
    return common.DataConfig(data_dir=str(folder), toy=True, download=False, cache_dir=str(folder), num_classes=21,
                             image_size=32, eval_size=None, limit_train=None, limit_val=None, train_set="train",
                             workers=0, seed=0)
