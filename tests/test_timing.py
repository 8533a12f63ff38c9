"""Inference backends agree with eager, the timing scripts' JSON/plot, and the ONNX export round-trip."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import common
import time_student
import time_teacher

TOLERANCE = {"eager": 0.0, "channels_last": 1e-4, "compile": 1e-3, "onnxruntime": 1e-3, "bf16": 0.15, "fp16": 0.05}


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return common.build_student(21, pretrained=False).eval()


@pytest.mark.parametrize("backend", common.TIMING_BACKENDS)
def test_backend_matches_eager_on_cpu(backend, student):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    try:
        fn = common.prepare_backend(student, backend, torch.device("cpu"), 64)
    except common.BackendUnavailable as e:
        pytest.skip(f"{backend}: {e}")
    with torch.inference_mode():
        ref = student(x)
        out = fn(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    scale = max(1.0, ref.abs().max().item())
    assert (out - ref).abs().max().item() <= TOLERANCE[backend] * scale


def test_fp16_is_refused_on_cpu(student):
    with pytest.raises(common.BackendUnavailable, match="CUDA"):
        common.prepare_backend(student, "fp16", torch.device("cpu"), 64)
    with pytest.raises(SystemExit, match="--backend fp16: none of them can run here"):
        time_student.main(time_student.get_args_parser().parse_args(
            ["--backend", "fp16", "--device", "cpu", "--no-miou", "--image-size", "64"]))


def test_time_student_json_and_plot(data_dir, tmp_path):
    weights = tmp_path / "student.pth"
    torch.manual_seed(0)
    torch.save({"model": common.build_student(21, pretrained=False).state_dict(), "arch": "student"}, weights)
    out = tmp_path / "student.json"
    argv = ["--weights", str(weights), "--toy", "--data-dir", data_dir, "--image-size", "64", "--limit-val", "4",
            "--workers", "0", "--backend", "eager,channels_last,bf16,fp16,onnxruntime", "--runs", "3", "--warmup", "1", "--batch-size", "2",
            "--json", str(out)]
    time_student.main(time_student.get_args_parser().parse_args(argv))
    report = json.loads(out.read_text())
    assert {"model", "params", "size_mb", "image_size", "device", "miou", "backends"} <= set(report)
    assert report["params"] == 3_813_957 and report["size_mb"] == pytest.approx(3_813_957 * 4 / 2 ** 20, rel=0.02)
    assert set(report["backends"]) == {"eager", "channels_last", "bf16", "fp16", "onnxruntime"}  # compile: tested above
    assert report["backends"]["fp16"] == {"unavailable": "fp16 inference is a CUDA backend; on CPU use bf16 where supported"}
    for name, b in report["backends"].items():
        if "unavailable" in b:
            continue
        assert {"latency_ms_median", "latency_ms_p90", "fps", "throughput_img_s", "max_abs_diff"} <= set(b), name
        assert b["latency_ms_p90"] >= b["latency_ms_median"] > 0
        assert b["fps"] == pytest.approx(1000 / b["latency_ms_median"])
        assert len(b["latencies_ms"]) == 3 and 0 <= b["miou"] <= 1
    assert report["backends"]["eager"]["max_abs_diff"] == 0.0
    assert report["miou"] == report["backends"]["eager"]["miou"]
    teacher_json = tmp_path / "teacher.json"
    argv = ["--no-pretrained", "--no-miou", "--image-size", "64", "--runs", "2", "--warmup", "1", "--batch-size", "2",
            "--json", str(teacher_json), "--plot", str(tmp_path / "timing.png"), "--compare", str(out)]
    time_teacher.main(time_teacher.get_args_parser().parse_args(argv))
    teacher = json.loads(teacher_json.read_text())
    assert teacher["miou"] is None and teacher["params"] == 32_957_013 and set(teacher["backends"]) == {"eager"}
    assert Image.open(tmp_path / "timing.png").size[0] >= 1000


def test_measure_latency_takes_turns_and_counts_runs():
    calls = []
    fns = {"a": lambda x: calls.append("a"), "b": lambda x: calls.append("b")}
    times = common.measure_latency(fns, None, 1, {"a": 6, "b": 3}, torch.device("cpu"), rounds=3)
    assert len(times["a"]) == 6 and len(times["b"]) == 3
    # warm-up, then 3 rounds, each turn one untimed call plus its share of the timed runs
    assert "".join(calls) == "ab" + "aaa" + "bb" + "aaa" + "bb" + "aaa" + "bb"


def _conv_and_matmul_flops(model, x):
    """FLOP of model(x) counted independently: hooks on every Conv2d plus the two products of the final upsampling."""
    flops = []
    hooks = [m.register_forward_hook(lambda m, i, o: flops.append(
        2 * o.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]))
        for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        logits = model(x)
    for h in hooks:
        h.remove()
    (n, c, height, width), (h16, w16) = logits.shape, (x.shape[-2] // 16, x.shape[-1] // 16)
    return sum(flops) + 2 * n * c * height * h16 * w16 + 2 * n * c * height * w16 * width


def test_vs_teacher_ratio_and_onnxruntime_profile(tmp_path, student):
    weights = tmp_path / "student.pth"
    torch.save(student.state_dict(), weights)
    out = tmp_path / "student.json"
    argv = ["--weights", str(weights), "--no-miou", "--image-size", "64", "--backend", "eager,onnxruntime",
            "--runs", "4", "--warmup", "1", "--batch-size", "2", "--vs-teacher", "--teacher-runs", "2", "--profile",
            "--json", str(out)]
    time_student.main(time_student.get_args_parser().parse_args(argv))
    report = json.loads(out.read_text())
    teacher = report["vs_teacher"]
    assert teacher["params"] == 32_957_013 and set(teacher["backends"]) == {"eager", "onnxruntime"}
    for name, t in teacher["backends"].items():
        assert len(t["latencies_ms"]) == 2 and t["latency_ms_median"] == pytest.approx(np.median(t["latencies_ms"]))
        assert t["ratio"] == pytest.approx(t["latency_ms_median"] / report["backends"][name]["latency_ms_median"])
    assert teacher["backends"]["eager"]["max_abs_diff"] == 0.0 and teacher["backends"]["onnxruntime"]["max_abs_diff"] < 1e-3
    flops = _conv_and_matmul_flops(student, torch.randn(1, 3, 64, 64))
    assert report["gflops"] == pytest.approx(flops / 1e9, rel=1e-9)
    profile = {r["kind"]: r for r in report["onnxruntime_profile"]}
    assert sum(r["gflop"] for r in profile.values()) == pytest.approx(flops / 1e9, rel=0.01)  # 21 -> 24 padded classes
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
    with pytest.raises(SystemExit, match="use time_student.py"):
        time_teacher.main(time_teacher.get_args_parser().parse_args(["--weights", str(weights), "--no-miou"]))
