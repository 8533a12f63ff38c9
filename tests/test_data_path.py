"""The two training data paths: --data-on-device (the split on the training device, batches augmented there) gives
the loader path's batches (images within float rounding, masks and everything else equal), the same epochs with
--accumulate and --limit-train, and exact resumes; the loader path keeps its workers for the whole run and leaves
none behind. Measured on CPU, which runs the same code as a GPU."""
import dataclasses
import json
import multiprocessing
import os

import pytest
import torch

import common
import device_data
import distill
import engine
import train_baseline
from conftest import VOC_SAMPLE, loop_config, small_run_args, toy_data_config

COMPARED = ("train_loss", "val_loss", "val_miou")


def _train_set(data_dir, cache_dir, size, limit, toy=True):
    cfg = common.DataConfig(data_dir=data_dir, toy=toy, download=False, cache_dir=str(cache_dir), num_classes=21,
                            image_size=size, eval_size=None, limit_train=limit, limit_val=None, train_set="train",
                            workers=0, seed=3)
    return common.build_datasets(cfg, splits=("train",))["train"]


def _compare_paths(dataset, epochs):
    """Every batch of `epochs` epochs from both paths: (largest image difference, mask pixels that differ, pixels)."""
    split = device_data.DeviceSplit(dataset, torch.device("cpu"))
    assert split.nbytes == device_data.split_bytes(dataset)
    worst, differ, pixels = 0.0, 0, 0
    for epoch in range(epochs):
        for start in range(0, len(dataset), 16):
            ks = list(range(start, min(start + 16, len(dataset))))
            loader = common.collate([dataset[(epoch, k)] for k in ks])
            device = split.batch(ks, epoch)
            assert set(device) == set(loader)
            for key in set(loader) - {"image", "mask"}:  # grid, index, cached teacher logits: the same values
                assert torch.equal(device[key], loader[key]), key
            assert device["mask"].dtype == loader["mask"].dtype == torch.int64
            worst = max(worst, (device["image"] - loader["image"]).abs().max().item())
            differ += int((device["mask"] != loader["mask"]).sum())
            pixels += loader["mask"].numel()
    return worst, differ, pixels


def _image_tolerance(dataset):
    """Both paths sample each image at the same point up to float32 rounding of its pixel coordinate (a few ulp of
    the largest width), which moves an intensity in [0, 1] by at most that much, then divided by the smallest std."""
    largest = max(max(dataset.cache.shapes[i]) for i in dataset.indices)
    return 8 * largest * 2.0 ** -24 / min(common.IMAGENET_STD)


def test_device_batches_equal_the_loader_batches_on_the_toy_set(data_dir, tmp_path):
    dataset = _train_set(data_dir, tmp_path, 48, 96)
    teacher = common.build_teacher(21, pretrained=False).eval()
    dataset.teacher_logits = distill.TeacherLogitCache(teacher, dataset, torch.device("cpu"), 16, 0, "fp32")
    worst, differ, pixels = _compare_paths(dataset, 2)
    assert worst <= _image_tolerance(dataset) and differ <= 1e-4 * pixels, (worst, differ, pixels)


@pytest.mark.skipif(not os.path.isdir(VOC_SAMPLE), reason="no ../shared/voc_sample (real VOC subset) beside the repo")
def test_device_batches_equal_the_loader_batches_on_real_voc_images(tmp_path):
    """Real images of many sizes (up to 500 px) in one padded buffer, at the recipe's 256 px."""
    dataset = _train_set(VOC_SAMPLE, tmp_path, 256, 48, toy=False)
    assert len({dataset.cache.shapes[i] for i in dataset.indices}) > 5
    worst, differ, pixels = _compare_paths(dataset, 1)
    assert worst <= _image_tolerance(dataset) and differ <= 1e-4 * pixels, (worst, differ, pixels)


@pytest.mark.parametrize("on_device", ["on", "off"])
def test_an_epoch_resumed_inside_gives_the_batches_left(on_device, data_dir, tmp_path):
    """TrainBatches.for_epoch(epoch, skip) is the tail of the whole epoch's batches, on both paths; the loader
    path's workers serve every epoch and are gone after close()."""
    dataset = _train_set(data_dir, tmp_path, 32, 40)
    data = dataclasses.replace(toy_data_config(tmp_path), workers=2 if on_device == "off" else 0, seed=3)
    cfg = loop_config(data=data, batch_size=8, data_on_device=on_device)
    batches = engine.TrainBatches(dataset, cfg)
    assert batches.on_device == (on_device == "on")
    workers = set()
    for epoch in range(3):
        whole = [b["index"].tolist() for b in batches.for_epoch(epoch)]
        tail = [b["index"].tolist() for b in batches.for_epoch(epoch, skip_batches=2)]
        assert len(whole) == 5 and tail == whole[2:]
        workers.add(tuple(sorted(p.pid for p in multiprocessing.active_children())))
    assert len(workers) == 1 and len(next(iter(workers))) == (2 if on_device == "off" else 0), workers
    batches.close()
    assert not multiprocessing.active_children()


def test_a_persistent_loaders_workers_stop_when_closed_though_it_is_still_referenced(data_dir, tmp_path):
    """engine.close_loader (train() closes its training and validation loaders so): the workers end now, not when a
    reference cycle around the loader is collected, which left them running in a process training run after run."""
    dataset = _train_set(data_dir, tmp_path, 32, 8)
    loader = engine.make_loader(dataset, 4, 2, persistent=True)
    cycle = [loader]
    cycle.append(cycle)
    assert len(list(loader)) == 2 and len(multiprocessing.active_children()) == 2
    engine.close_loader(loader)
    assert not multiprocessing.active_children() and len(list(loader)) == 2  # still usable: new workers
    engine.close_loader(loader)
    assert not multiprocessing.active_children()


def test_auto_puts_the_split_on_a_gpu_with_room_and_never_on_a_cpu(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert not device_data.resolve("auto", cpu, 1) and device_data.resolve("on", cpu, 10 ** 15)
    assert not device_data.resolve("off", gpu, 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (8 * 2 ** 30, 80 * 2 ** 30))
    assert device_data.resolve("auto", gpu, 4 * 2 ** 30)  # exactly the share: on
    assert not device_data.resolve("auto", gpu, 4 * 2 ** 30 + 1)


def test_device_path_trains_like_the_loader_path(data_dir, tmp_path):
    """The same run on both paths (--accumulate 2, --limit-train 24): the same epochs within float rounding, the
    choice and its size recorded in config.json."""
    histories = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        argv = small_run_args(data_dir, out, "--epochs", "2", "--image-size", "32", "--limit-train", "24",
                              "--accumulate", "2", "--lr", "1e-3", "--data-on-device", mode)
        histories[mode] = train_baseline.main(train_baseline.get_args_parser().parse_args(argv))
        config = json.loads((out / "config.json").read_text())
        assert config["data_path"] == ("device" if mode == "on" else "loader") and config["data_bytes"] > 0
    for a, b in zip(histories["on"], histories["off"]):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=2e-3, abs=1e-3), (a["epoch"], key)
