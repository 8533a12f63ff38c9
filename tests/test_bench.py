"""bench_throughput.py: every figure the GPU check reports, from the real training step, on a tiny CPU setting."""
import json

import bench_throughput


def test_benchmark_reports_every_figure(data_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_throughput.main(bench_throughput.get_args_parser().parse_args(
        ["--toy", "--data-dir", data_dir, "--image-size", "32", "--batch-size", "2", "--steps", "2", "--warmup", "1",
         "--workers", "0", "--memory-format", "both", "--json", str(out)]))
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report  # last stdout line: the JSON
    assert report["loader_img_s"] > 0 and report["teacher_cache_build_img_s"] > 0
    assert report["precision"] == "fp32" and report["image_size"] == 32 and report["batch_size"] == 2
    expected = {f"{s} {m}" for s in bench_throughput.STRATEGIES for m in ("channels_last", "contiguous")}
    assert {"cwd", "dist"} < set(bench_throughput.STRATEGIES)
    assert set(report["train"]) == expected
    for figures in report["train"].values():
        assert figures["img_s"] > 0 and 0 <= figures["data_wait_frac"] < 1
