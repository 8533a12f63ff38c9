"""Inference backends agree with eager, the timing scripts' JSON/plot, and the ONNX export round-trip."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import common
import errors
import evaluate
import time_student
import time_teacher
import timing
from student_model import upsample_bilinear

# max |backend - eager| / max |eager|: fp32 backends only reorder sums; bf16 rounds every op to 2^-8
TOLERANCE = {"channels_last": 1e-4, "compile": 1e-3, "onnxruntime": 1e-3, "bf16": 8 * 2.0 ** -8}


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return common.build_student(21, pretrained=False).eval()


class TinySegNet(torch.nn.Module):
    """Conv-BN-ReLU at stride 2 and the student's matrix upsampling: what torch.compile must handle, small enough
    that Inductor's C++ build takes seconds, not the minute the whole student takes on 2 cores."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8),
                                        torch.nn.ReLU(), torch.nn.Conv2d(8, 5, 1))

    def forward(self, x):
        return upsample_bilinear(self.body(x), x.shape[-2:])


@pytest.mark.parametrize("backend", [b for b in timing.TIMING_BACKENDS if b != "eager"])
def test_backend_matches_eager_on_cpu(backend, student, compile_workers_stopped, monkeypatch):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model = TinySegNet().eval() if backend == "compile" else student
    if backend == "compile":  # Inductor's scalar C++ (its vectorised kernels' headers double the compile time)
        from torch._inductor import config
        monkeypatch.setattr(config.cpp, "vec_isa_ok", False)
    try:
        fn = timing.prepare_backend(model, backend, torch.device("cpu"), 64)
    except timing.BackendUnavailable as e:
        assert backend == "fp16", f"{backend} must run on every CPU: {e}"
        pytest.skip(f"{backend}: {e}")
    with torch.inference_mode():
        ref = model(x)
        out = fn(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    diff = (out - ref).abs().max().item()
    assert diff <= TOLERANCE[backend] * ref.abs().max().item()
    if backend == "bf16":
        assert diff > 0  # it really ran in bf16


def test_fp16_is_refused_on_cpu(student):
    with pytest.raises(timing.BackendUnavailable, match="CUDA"):
        timing.prepare_backend(student, "fp16", torch.device("cpu"), 64)
    with pytest.raises(errors.UserError, match="--backend fp16: none of them can run here"):
        time_student.main(time_student.get_args_parser().parse_args(
            ["--backend", "fp16", "--device", "cpu", "--no-miou", "--image-size", "64"]))


def test_time_student_json_and_plot(data_dir, tmp_path):
    weights = tmp_path / "student.pth"
    torch.manual_seed(0)
    torch.save({"model": common.build_student(21, pretrained=False).state_dict(), "arch": "student"}, weights)
    out = tmp_path / "student.json"
    argv = ["--weights", str(weights), "--toy", "--data-dir", data_dir, "--image-size", "64", "--limit-val", "4",
            "--workers", "0", "--backend", "eager,channels_last,bf16,fp16,onnxruntime", "--runs", "3", "--warmup", "1",
            "--batch-size", "2",
            "--json", str(out)]
    time_student.main(time_student.get_args_parser().parse_args(argv))
    report = json.loads(out.read_text())
    assert {"model", "params", "size_mb", "image_size", "device", "miou", "backends"} <= set(report)
    assert report["params"] == 3_813_957 and report["size_mb"] == pytest.approx(3_813_957 * 4 / 2 ** 20, rel=0.02)
    assert set(report["backends"]) == {"eager", "channels_last", "bf16", "fp16", "onnxruntime"}  # compile: tested above
    assert report["backends"]["fp16"] == {"unavailable": "fp16 inference is a CUDA backend; on CPU use bf16"}
    for name, b in report["backends"].items():
        if "unavailable" in b:
            continue
        assert {"latency_ms_median", "latency_ms_p90", "fps", "throughput_img_s", "max_abs_diff"} <= set(b), name
        assert len(b["latencies_ms"]) == 3 and b["latency_ms_median"] > 0 and 0 <= b["miou"] <= 1
    assert report["backends"]["bf16"]["max_abs_diff"] > 0  # bf16 runs on every CPU, natively or emulated
    # the eager val mIoU against an independent evaluation of the same weights
    eval_json = tmp_path / "eval.json"
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--weights", str(weights), "--toy", "--data-dir", data_dir, "--image-size", "64", "--limit-val", "4",
         "--workers", "0", "--json", str(eval_json)]))
    assert report["miou"] == report["backends"]["eager"]["miou"] == json.loads(eval_json.read_text())["miou"]
    teacher_json = tmp_path / "teacher.json"
    argv = ["--no-pretrained", "--no-miou", "--image-size", "64", "--runs", "2", "--warmup", "1", "--batch-size", "2",
            "--json", str(teacher_json), "--plot", str(tmp_path / "timing.png"), "--compare", str(out)]
    time_teacher.main(time_teacher.get_args_parser().parse_args(argv))
    teacher = json.loads(teacher_json.read_text())
    assert teacher["miou"] is None and teacher["params"] == 32_957_013 and set(teacher["backends"]) == {"eager"}
    assert Image.open(tmp_path / "timing.png").size[0] >= 1000


def test_measure_latency_counts_runs_per_function():
    calls = {"a": 0, "b": 0}

    def count(name):
        def fn(x):
            calls[name] += 1
        return fn
    times = timing.measure_latency({"a": count("a"), "b": count("b")}, None, 1, {"a": 6, "b": 3}, torch.device("cpu"),
                                   rounds=3)
    assert len(times["a"]) == 6 and len(times["b"]) == 3 and all(t >= 0 for t in times["a"] + times["b"])
    # each function also ran its warm-up call and one untimed call per round
    assert calls == {"a": 1 + 3 + 6, "b": 1 + 3 + 3}


def _conv_and_matmul_flops(model, x, block=1):
    """FLOP of model(x) counted independently: hooks on every Conv2d plus the two products of the final upsampling.
    block > 1: channel counts padded up to multiples of block, as ONNX Runtime's blocked NCHWc kernels compute
    (8 channels on AVX2, 16 on AVX-512)."""
    def pad(c):
        return -(-c // block) * block

    def conv_flops(m, out):
        positions = out.numel() // out.shape[1]
        if m.groups == m.in_channels == m.out_channels:  # depthwise: each channel sees only itself
            return 2 * positions * pad(m.out_channels) * m.kernel_size[0] * m.kernel_size[1]
        taps = m.kernel_size[0] * m.kernel_size[1]
        return 2 * positions * pad(m.out_channels) * pad(m.in_channels) // m.groups * taps
    flops = []
    hooks = [m.register_forward_hook(lambda m, i, o: flops.append(conv_flops(m, o)))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        logits = model(x)
    for h in hooks:
        h.remove()
    (n, c, height, width), (h16, w16) = logits.shape, (x.shape[-2] // 16, x.shape[-1] // 16)
    return sum(flops) + 2 * n * pad(c) * height * h16 * w16 + 2 * n * pad(c) * height * w16 * width


def test_vs_teacher_and_onnxruntime_profile(tmp_path, student):
    weights = tmp_path / "student.pth"
    torch.save(student.state_dict(), weights)
    out = tmp_path / "student.json"
    argv = ["--weights", str(weights), "--no-miou", "--image-size", "64", "--backend", "eager,onnxruntime",
            "--runs", "2", "--warmup", "1", "--batch-size", "2", "--vs-teacher", "--teacher-runs", "1", "--profile",
            "--json", str(out)]
    time_student.main(time_student.get_args_parser().parse_args(argv))
    report = json.loads(out.read_text())
    teacher = report["vs_teacher"]
    assert teacher["params"] == 32_957_013 and set(teacher["backends"]) == {"eager", "onnxruntime"}
    assert all(len(t["latencies_ms"]) == 1 and t["ratio"] > 0 for t in teacher["backends"].values())
    assert 0 < teacher["backends"]["onnxruntime"]["max_abs_diff"] < 1e-3
    x = torch.randn(1, 3, 64, 64)
    flops = _conv_and_matmul_flops(student, x)
    assert report["gflops"] == pytest.approx(flops / 1e9, rel=1e-9)
    # ONNX Runtime's kernels report what they compute, channel padding included: at least our count, at most our
    # count with every channel dimension padded to AVX-512's 16 (holds for AVX2's 8 and for unpadded kernels too)
    profile = {r["kind"]: r for r in report["onnxruntime_profile"]}
    profiled = sum(r["gflop"] for r in profile.values()) * 1e9
    assert flops * (1 - 1e-9) <= profiled <= _conv_and_matmul_flops(student, x, block=16) * (1 + 1e-9)
    assert {"conv 1x1", "conv 3x3", "conv depthwise 5x5", "matmul (final upsampling)"} <= set(profile)
    assert all(r["ms"] > 0 for r in profile.values()) and report["gemm_gflops_per_s"] > 0


def test_onnx_export_round_trip(tmp_path, student):
    weights = tmp_path / "student.pth"
    torch.save(student.state_dict(), weights)
    path = tmp_path / "student.onnx"
    time_student.main(time_student.get_args_parser().parse_args(
        ["--weights", str(weights), "--export-onnx", str(path), "--image-size", "64"]))
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 64, 64)  # a batch size the export never saw: the batch axis is dynamic
    with torch.inference_mode():
        ref = student(x).numpy()
    np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], ref, atol=1e-4, rtol=0)


def test_timing_scripts_refuse_the_other_architecture(tmp_path, student):
    weights = tmp_path / "student.pth"
    torch.save(student.state_dict(), weights)
    with pytest.raises(errors.UserError, match="holds a student, not a teacher checkpoint"):
        time_teacher.main(time_teacher.get_args_parser().parse_args(["--weights", str(weights), "--no-miou"]))
