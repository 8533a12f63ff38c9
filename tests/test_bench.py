"""bench_throughput.py: every figure the GPU check reports, from the real training step, on a tiny CPU setting."""
import json

import pytest

import bench_throughput


def test_benchmark_reports_every_figure(data_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_throughput.main(bench_throughput.get_args_parser().parse_args(
        ["--toy", "--data-dir", data_dir, "--image-size", "32", "--batch-size", "2", "--epoch-images", "4",
         "--warmup", "1", "--workers", "0", "--json", str(out)]))
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report  # last stdout line: the JSON
    assert report["loader_img_s"] > 0 and report["teacher_cache_build_img_s"] > 0
    assert report["precision"] == "fp32" and report["image_size"] == 32 and report["batch_size"] == 2
    assert report["epoch_images"] == 4
    expected = {f"{s} device-data {p}" for s in bench_throughput.STRATEGIES for p in ("on", "off")}
    assert {"cwd", "dist"} < set(bench_throughput.STRATEGIES)
    assert set(report["train"]) == expected
    for figures in report["train"].values():
        assert figures["img_s"] > 0 and 0 <= figures["data_wait_frac"] < 1 and figures["peak_memory_mb"] is None


def test_every_setting_asked_for_is_timed():
    args = bench_throughput.get_args_parser().parse_args(["--memory-format", "both", "--compile", "both",
                                                          "--data-on-device", "off"])
    assert bench_throughput.variants(args) == [
        ("channels_last eager", "channels_last", "off", False), ("channels_last compiled", "channels_last", "off", True),
        ("contiguous eager", "contiguous", "off", False), ("contiguous compiled", "contiguous", "off", True)]
    default = bench_throughput.get_args_parser().parse_args([])
    assert [v[0] for v in bench_throughput.variants(default)] == ["device-data on", "device-data off"]


def test_a_small_training_set_is_repeated_to_a_real_size_epoch(data_dir, tmp_path):
    import common
    from conftest import toy_data_config
    dataset = common.build_datasets(toy_data_config(tmp_path), splits=("train",))["train"]
    n = len(dataset)
    bench_throughput.epoch_sized(dataset, 1464)
    assert len(dataset) == 1464 and dataset.indices[:n] == dataset.indices[n:2 * n] == list(range(n))


def test_strategies_are_timed_in_turns():
    """Every strategy trains one whole timed epoch per round, in turn (a drifting machine slows all alike, and no
    loader's workers get ahead while another trains); the figures add up its epochs."""
    import engine
    calls = []

    class Fake:
        def __init__(self, name):
            self.name, self.timed = name, engine.EpochProgress(1)

        def epoch(self, dataset, warmup, round_):
            calls.append((self.name, warmup, round_))
            self.timed.images += 4
            self.timed.seconds += 1.0 if self.name == "a" else 2.0
            self.timed.wait += 0.1
    trainees = {"a": Fake("a"), "b": Fake("b")}
    result = bench_throughput.train_in_turns(trainees, None, warmup=2, rounds=3)
    assert calls == [("a", 2, 0), ("b", 2, 0), ("a", 2, 1), ("b", 2, 1), ("a", 2, 2), ("b", 2, 2)]
    assert result == {"a": pytest.approx((4.0, 0.1)), "b": pytest.approx((2.0, 0.05))}
