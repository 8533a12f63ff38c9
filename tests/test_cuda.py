"""The CUDA-only paths (marker `cuda`; every test here skips with a reason where torch.cuda.is_available() is false):
each training script with --amp (bf16, fp16) and channels_last, an fp16 run's resume with its GradScaler state, the
teacher-logit cache built on CUDA against the CPU one, evaluation on CUDA against CPU (single- and multi-scale +
flip), torchrun with NCCL (with --sync-bn), every CUDA timing backend against eager, the CUDA RNG state round trip.

    python -m pytest -m cuda tests          # or: bash tools/gpu_check.sh (these tests and the throughput benchmark)

The CPU half of the mixed-precision logic is tested on every CPU in test_precision.py."""
import json
import subprocess
import sys

import pytest
import torch

import common
import distill
import engine
import evaluate
import methods
import timing
import train_baseline
import train_response_kd
from conftest import REPO, loop_config, small_run_args, toy_data_config

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())")]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# unit roundoff of what runs: fp32 convolutions on CUDA use TF32 by default (10-bit mantissa, like fp16)
UNIT_ROUNDOFF = {"fp32": 2.0 ** -11, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}


def assert_close_in_precision(out, ref, unit_roundoff):
    """out agrees with ref as two runs of one network in that precision can: on average within 4 roundoffs of the
    output scale, nowhere beyond 32 (cancellation in deep sums), the same argmax almost everywhere."""
    scale, diff = ref.abs().max().item(), (out.float() - ref.float()).abs()
    assert diff.mean().item() <= 4 * unit_roundoff * scale
    assert diff.max().item() <= 32 * unit_roundoff * scale
    assert (out.argmax(1) == ref.argmax(1)).float().mean().item() >= 0.98


def gpu_args(data_dir, out, *extra):
    return small_run_args(data_dir, out, "--device", "cuda", "--epochs", "1", "--image-size", "64", *extra)


@pytest.fixture(scope="module")
def cuda_teacher(data_dir, tmp_path_factory):
    """A teacher fine-tuned for one short epoch on CUDA with --amp."""
    out = tmp_path_factory.mktemp("cuda_teacher")
    train_baseline.main(train_baseline.get_args_parser().parse_args(
        gpu_args(data_dir, out, "--model", "teacher", "--limit-train", "16", "--amp")))
    return str(out / "best.pth")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("name", list(methods.registry()))
def test_every_method_with_amp_and_channels_last(name, amp, data_dir, cuda_teacher, tmp_path):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    method = methods.registry()[name]
    extra = [] if method.TEACHER == "none" else ["--teacher-weights", cuda_teacher]
    out = tmp_path / "run"
    methods.main(method, methods.get_args_parser(method).parse_args(
        gpu_args(data_dir, out, "--amp", amp, "--channels-last", *extra)))
    config = json.loads((out / "config.json").read_text())
    record = json.loads((out / "history.json").read_text())[0]
    assert config["amp"] == amp and config["channels_last"]
    if method.TEACHER != "none":  # the CUDA default: the GPU's 16-bit type
        assert config["teacher_dtype"] == engine.low_precision(CUDA)
    assert all(v == v and abs(v) != float("inf") for k, v in record.items() if k.startswith(("train_loss", "val_")))


def test_fp16_run_resumes_with_its_grad_scaler(data_dir, tmp_path):
    out = tmp_path / "run"
    base = gpu_args(data_dir, out, "--amp", "fp16")
    train_baseline.main(train_baseline.get_args_parser().parse_args(base))
    saved = torch.load(out / "last.pth", weights_only=True)["scaler"]
    assert saved is not None and saved["scale"] > 0
    model = common.build_student(21, pretrained=False).to(CUDA)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max")
    scaler = torch.amp.GradScaler("cuda", init_scale=1.0)
    args = train_baseline.get_args_parser().parse_args(base + ["--resume", "--epochs", "2"])
    cfg = engine.setup(args, "baseline-student")
    engine.restore_checkpoint(cfg.resume, model, torch.nn.ModuleDict(), optimizer, scheduler, scaler, cfg, "student")
    assert scaler.get_scale() == saved["scale"]
    train_baseline.main(args)  # and the run itself continues
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [0, 1]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_logit_cache_built_on_cuda_equals_the_cpu_cache(precision, data_dir, cuda_teacher, tmp_path):
    teacher = common.load_model(cuda_teacher).model.eval()
    caches = {}
    for device in (CPU, CUDA):
        args = train_response_kd.get_args_parser().parse_args(
            ["--toy", "--data-dir", data_dir, "--image-size", "64", "--limit-train", "8", "--workers", "0",
             "--cache-dir", str(tmp_path / device.type)])
        dataset = common.build_datasets(common.data_config(args), splits=("train",))["train"]
        cache = distill.TeacherLogitCache(teacher.to(device), dataset, device, 4, 0, precision)
        caches[device.type] = torch.stack([cache(i).float() for i in range(len(dataset))])
    assert_close_in_precision(caches["cuda"], caches["cpu"], UNIT_ROUNDOFF[precision])


@pytest.mark.parametrize("views", [[], ["--scales", "0.5,1.0,1.5", "--flip"]])
def test_evaluate_on_cuda_agrees_with_cpu(views, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_baseline.main(train_baseline.get_args_parser().parse_args(gpu_args(data_dir, out, "--epochs", "2")))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare fp32 with fp32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    reports = {}
    for device in ("cpu", "cuda"):
        path = tmp_path / f"{device}.json"
        evaluate.main(evaluate.get_args_parser().parse_args(
            ["--weights", str(out / "best.pth"), "--toy", "--data-dir", data_dir, "--workers", "0", "--limit-val",
             "24", "--device", device, "--json", str(path), *views]))
        reports[device] = json.loads(path.read_text())
    assert reports["cuda"]["num_images"] == reports["cpu"]["num_images"] == 24
    assert reports["cuda"]["flip"] is reports["cpu"]["flip"] is bool(views)
    # fp32 on both: only the order of sums differs, which may flip the argmax of a near-tied pixel, no more
    assert reports["cuda"]["miou"] == pytest.approx(reports["cpu"]["miou"], abs=1e-3)
    assert reports["cuda"]["pixel_acc"] == pytest.approx(reports["cpu"]["pixel_acc"], abs=1e-3)


@pytest.mark.parametrize("extra", [[], ["--sync-bn"]])
def test_torchrun_with_nccl(extra, data_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           "train_baseline.py", *gpu_args(data_dir, out, *extra)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "device cuda:0 x 1 process(es)" in proc.stdout and "done: best val mIoU" in proc.stdout
    assert json.loads((out / "config.json").read_text())["sync_bn"] == bool(extra)


BACKEND_PRECISION = {"channels_last": "fp32", "compile": "fp32", "onnxruntime": "fp32", "bf16": "bf16",
                     "fp16": "fp16"}


@pytest.mark.parametrize("backend", sorted(BACKEND_PRECISION))
def test_cuda_timing_backend_matches_eager(backend, compile_workers_stopped):
    torch.manual_seed(0)
    model = common.build_student(21, pretrained=False).eval().to(CUDA)
    x = torch.randn(2, 3, 128, 128, device=CUDA)
    try:
        fn = timing.prepare_backend(model, backend, CUDA, 128)
    except timing.BackendUnavailable as e:
        assert backend == "onnxruntime", f"{backend} must run on CUDA: {e}"
        pytest.skip(f"{backend}: {e}")
    with torch.inference_mode():
        ref, out = model(x), fn(x)
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.device.type == "cuda"
    assert_close_in_precision(out, ref, UNIT_ROUNDOFF[BACKEND_PRECISION[backend]])


def test_cuda_rng_state_round_trip(tmp_path):
    cfg = loop_config(device=CUDA, data=toy_data_config(tmp_path), out_dir=str(tmp_path),
                      resume=str(tmp_path / "last.pth"), channels_last=True, flags={"strategy": "test"})
    model = torch.nn.Linear(2, 2).to(CUDA)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max")
    torch.cuda.manual_seed(123)
    ckpt = engine.make_checkpoint(model, torch.nn.ModuleDict(), optimizer, scheduler, None, engine.RunState(1), cfg,
                                  "student")
    ckpt["args"] = {"strategy": "test"}
    engine.save_checkpoint(ckpt, cfg.resume)
    expected = torch.rand(4, device=CUDA)
    torch.cuda.manual_seed(999)  # moves the generator elsewhere
    engine.restore_checkpoint(cfg.resume, model, torch.nn.ModuleDict(), optimizer, scheduler, None, cfg, "student")
    torch.testing.assert_close(torch.rand(4, device=CUDA), expected, rtol=0, atol=0)


def test_device_resident_split_on_cuda_gives_the_loader_batches(data_dir, tmp_path):
    """--data-on-device on a GPU: the split uploaded once, each batch augmented there, equals the CPU loader path's
    batch (images within float rounding, masks and grids equal); auto chooses it for a split this small."""
    import device_data
    dataset = common.build_datasets(toy_data_config(tmp_path), splits=("train",))["train"]
    assert device_data.resolve("auto", CUDA, device_data.split_bytes(dataset))
    split = device_data.DeviceSplit(dataset, CUDA)
    ks = list(range(16))
    on_gpu = split.batch(ks, 1)
    loader = common.collate([dataset[(1, k)] for k in ks])
    assert on_gpu["image"].is_cuda and torch.equal(on_gpu["index"].cpu(), loader["index"])
    torch.testing.assert_close(on_gpu["grid"].cpu(), loader["grid"], rtol=0, atol=1e-6)
    assert (on_gpu["image"].cpu() - loader["image"]).abs().max().item() <= 1e-3
    assert (on_gpu["mask"].cpu() != loader["mask"]).float().mean().item() <= 1e-3
