"""bench_throughput.py: every figure the GPU check reports, from the real training step, on a tiny CPU setting."""
import json

import pytest

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


def test_strategies_are_timed_in_turns():
    """Every strategy trains its share of the timed steps in each round, in turn (a drifting machine slows all
    alike); the warm-up steps are not counted; the shares add up to --steps."""
    import engine
    calls = []

    class Fake:
        def __init__(self, name):
            self.name, self.timed = name, engine.EpochProgress(1)

        def train(self, dataset, batches, seed, progress):
            calls.append((self.name, batches, seed, progress is self.timed))
            if progress is self.timed:
                progress.images += 4 * batches
                progress.seconds += batches * (1.0 if self.name == "a" else 2.0)
                progress.wait += 0.1 * batches
    trainees = {"a": Fake("a"), "b": Fake("b")}
    result = bench_throughput.train_in_turns(trainees, None, warmup=2, steps=7, rounds=3)
    assert calls == [("a", 2, 0, False), ("b", 2, 0, False),
                     ("a", 3, 1, True), ("b", 3, 1, True), ("a", 2, 2, True), ("b", 2, 2, True),
                     ("a", 2, 3, True), ("b", 2, 3, True)]
    assert result == {"a": pytest.approx((4.0, 0.1)), "b": pytest.approx((2.0, 0.05))}
