"""End to end: train_baseline.py CLI, every output file, exact resume, refusing to overwrite a run,
evaluate.py --json vs --save-predictions, evaluate.py on real VOC files when present."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import engine
import errors
import evaluate
import train_baseline
import voc
from conftest import REPO, VOC_SAMPLE, assert_flag_refused, small_run_args
from student_model import LightweightDeepLabV3

HISTORY_KEYS = {"epoch", "train_loss", "train_loss_ce", "val_loss", "val_miou", "val_pixel_acc", "lr", "epoch_s",
                "val_classes_predicted",
                "train_img_s", "data_wait_frac"}


def run_baseline(argv):
    return train_baseline.main(train_baseline.get_args_parser().parse_args(argv))


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    """A 2-epoch baseline run through the real command line, its output redirected as `> log.txt 2>&1`: a clean log,
    plain progress lines every --log-every steps and one line per epoch, no carriage returns (no progress bars)."""
    out, log = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("log") / "log.txt"
    argv = small_run_args(data_dir, out, "--epochs", "2", "--save-every", "2", "--lr", "1e-3", "--log-every", "2")
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "train_baseline.py", *argv], cwd=REPO, stdout=f,
                              stderr=subprocess.STDOUT)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text and "epoch   1 | train loss" in text and "best val mIoU" in text
    progress = re.findall(r"^epoch (\d) batch (\d)/4 \| loss \d+\.\d{4} \| [\d.]+ img/s$", text, re.M)
    assert progress == [("0", "2"), ("0", "4"), ("1", "2"), ("1", "4")]  # 32 images, batch 8: 4 steps per epoch
    return out


def test_baseline_cli_writes_every_output(trained_run):
    for name in ("last.pth", "best.pth", "epoch_002.pth", "history.json", "config.json", "loss.png", "miou.png"):
        assert os.path.getsize(trained_run / name) > 0, name
    history = json.loads((trained_run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]
    assert HISTORY_KEYS <= set(history[0])
    assert 0 <= history[-1]["val_miou"] <= 100 and 0 <= history[-1]["data_wait_frac"] <= 1  # percent, a fraction
    best = torch.load(trained_run / "best.pth", map_location="cpu", weights_only=True)
    assert set(best) == {"model", "epoch", "best_miou", "history", "args", "arch", "num_classes",
                         "metric_unit"}  # no optimizer state
    assert os.path.getsize(trained_run / "best.pth") < 0.5 * os.path.getsize(trained_run / "last.pth")
    ckpt = torch.load(trained_run / "last.pth", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "best_miou", "history", "args", "arch",
            "num_classes"} <= set(ckpt)
    assert ckpt["best_miou"] == max(h["val_miou"] for h in history)
    assert Image.open(trained_run / "loss.png").size[0] > 100


def test_a_checkpoint_in_fractions_resumes_in_percent():
    """Checkpoints from before every figure became a percentage hold fractions; their history is converted on resume."""
    old = {"best_miou": 0.25, "history": [{"epoch": 0, "val_miou": 0.25, "val_pixel_acc": 0.5, "val_loss": 1.5}]}
    assert engine.history_in_percent(old) == (25.0, [{"epoch": 0, "val_miou": 25.0, "val_pixel_acc": 50.0,
                                                      "val_loss": 1.5}])
    new = dict(old, metric_unit="percent")
    assert engine.history_in_percent(new) == (0.25, old["history"])


def test_resume_continues_exactly(data_dir, tmp_path):
    full, parts = tmp_path / "full", tmp_path / "parts"
    run_baseline(small_run_args(data_dir, full, "--epochs", "3", "--lr", "1e-3"))
    run_baseline(small_run_args(data_dir, parts, "--epochs", "2", "--lr", "1e-3"))  # "interrupted" after 2
    run_baseline(small_run_args(data_dir, parts, "--epochs", "3", "--lr", "1e-3", "--resume"))
    a = json.loads((full / "history.json").read_text())
    b = json.loads((parts / "history.json").read_text())
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss", "val_miou", "val_pixel_acc", "lr"):
            assert ra[key] == rb[key], (ra["epoch"], key)
    sa = torch.load(full / "last.pth", weights_only=True)["model"]
    sb = torch.load(parts / "last.pth", weights_only=True)["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_refuses_to_overwrite_a_run_and_bad_flags(data_dir, trained_run, capsys):
    with pytest.raises(errors.UserError, match="already holds a run"):
        run_baseline(small_run_args(data_dir, trained_run, "--epochs", "1"))
    with pytest.raises(errors.UserError, match="arch=student, this one has arch=teacher"):
        run_baseline(small_run_args(data_dir, trained_run, "--epochs", "3", "--model", "teacher", "--resume"))
    for bad in (["--epochs", "0"], ["--batch-size", "0"], ["--lr", "-1"]):
        assert_flag_refused(train_baseline, ["--toy", *bad], capsys)


def test_evaluate_json_agrees_with_saved_predictions(data_dir, toy_root, trained_run, tmp_path):
    preds = tmp_path / "preds"
    args = evaluate.get_args_parser().parse_args(
        ["--weights", str(trained_run / "best.pth"), "--toy", "--data-dir", data_dir, "--workers", "0",
         "--json", str(tmp_path / "m.json"), "--save-predictions", str(preds), "--analysis", str(tmp_path / "plots"),
         "--save-vis", str(tmp_path / "vis"), "--num-vis", "4"])
    evaluate.main(args)
    report = json.loads((tmp_path / "m.json").read_text())
    assert set(report) >= {"miou", "pixel_acc", "mean_class_acc", "iou_per_class", "num_images"}
    ids = voc.read_split_ids(toy_root, "val")
    assert report["num_images"] == len(ids) and sorted(os.listdir(preds)) == sorted(i + ".png" for i in ids)
    cm = common.ConfusionMatrix(21)
    for image_id in ids:  # recompute from the PNGs and the original masks, independently of evaluate()
        pred = np.asarray(Image.open(preds / f"{image_id}.png"))
        gt = np.asarray(Image.open(os.path.join(toy_root, "SegmentationClass", image_id + ".png")))
        assert pred.shape == gt.shape
        cm.update(torch.from_numpy(gt.astype(np.int64)), torch.from_numpy(pred.astype(np.int64)))
    again = cm.compute()
    assert report["miou"] == pytest.approx(again["miou"], abs=1e-12)
    assert report["pixel_acc"] == pytest.approx(again["pixel_acc"], abs=1e-12)
    for name, value in zip(common.VOC_CLASSES, again["iou_per_class"]):
        assert (report["iou_per_class"][name] is None) == np.isnan(value)
    for name in ("per_class_iou.png", "confusion.png"):
        assert Image.open(tmp_path / "plots" / name).size[0] >= 700
    # the panels are the 2 worst and 2 best images by per-image mIoU, recomputed here with plain numpy
    per_image = {}
    for image_id in ids:
        pred = np.asarray(Image.open(preds / f"{image_id}.png")).astype(int)
        gt = np.asarray(Image.open(os.path.join(toy_root, "SegmentationClass", image_id + ".png"))).astype(int)
        valid = gt != 255
        ious = [np.sum((gt == c) & (pred == c) & valid) / np.sum(((gt == c) | (pred == c)) & valid)
                for c in range(21) if np.sum(((gt == c) | (pred == c)) & valid)]
        per_image[image_id] = float(np.mean(ious))
    ranked = sorted(ids, key=lambda i: (per_image[i], ids.index(i)))
    expected = ranked[:2] + ranked[::-1][:2]
    shown = sorted(os.listdir(tmp_path / "vis"))
    assert [name[3:-4] for name in shown] == expected
    assert Image.open(tmp_path / "vis" / shown[0]).size[0] >= 900


def test_most_confused_pairs_against_hand_computation():
    confusion = torch.tensor([[50, 30, 20], [0, 10, 0], [1, 0, 0]])
    pairs = evaluate.most_confused_pairs(confusion, ["a", "b", "c"], k=3)
    # row-normalised off-diagonals: a->b 0.3, a->c 0.2, c->a 1.0 (c has 1 pixel, all predicted a)
    assert [(t, p) for t, p, _, _ in pairs] == [("c", "a"), ("a", "b"), ("a", "c")]
    assert [round(f, 6) for _, _, f, _ in pairs] == [1.0, 0.3, 0.2] and pairs[1][3] == 30


@pytest.mark.skipif(not os.path.isdir(VOC_SAMPLE), reason="../shared/voc_sample not present")
def test_evaluate_runs_on_real_voc_files(tmp_path):
    root = voc.find_voc_root(VOC_SAMPLE)
    ids = voc.read_split_ids(root, "val")[:24]  # real JPEGs and palette PNGs; a few are enough for the CLI
    sample = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(sample / sub)
    for image_id in ids:
        for sub, ext in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png")):
            os.symlink(os.path.join(root, sub, image_id + ext), sample / sub / (image_id + ext))
    (sample / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    weights = tmp_path / "student.pth"
    torch.manual_seed(0)
    torch.save(LightweightDeepLabV3(21).state_dict(), weights)  # bare state_dict, random weights
    proc = subprocess.run([sys.executable, "evaluate.py", "--weights", str(weights),
                           "--data-dir", str(tmp_path / "voc"),
                           "--cache-dir", str(tmp_path / "cache"), "--image-size", "96", "--workers", "0",
                           "--no-download", "--json", str(tmp_path / "m.json")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["num_images"] == len(ids) and 0 <= report["miou"] <= 1 and report["precision"] == "fp32"
    assert "mIoU" in proc.stdout


def test_html_browser_page_references_existing_files(data_dir, trained_run, tmp_path):
    out = tmp_path / "html"
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--weights", str(trained_run / "best.pth"), "--toy", "--data-dir", data_dir, "--workers", "0",
         "--limit-val", "6", "--html", str(out), "--save-predictions", str(tmp_path / "preds")]))
    page = (out / "index.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) == 3 * 6 and all((out / s).is_file() for s in sources)
    assert "http" not in page.lower().replace("http-equiv", "")  # nothing fetched from the network
    rows = re.findall(r"<tr><td>([^<]+)</td><td>([0-9.]+)</td>", page)
    assert len(rows) == 6
    for image_id, shown in rows:  # the page's per-image mIoU matches the saved prediction
        pred = np.asarray(Image.open(tmp_path / "preds" / f"{image_id}.png"))
        gt = np.asarray(Image.open(os.path.join(data_dir, "toy", "VOCdevkit", "VOC2012", "SegmentationClass",
                                                image_id + ".png")))
        np.testing.assert_array_equal(np.asarray(Image.open(out / "img" / f"{image_id}_pred.png"))[..., :3],
                                      evaluate.colorize(pred))
        assert float(shown) == pytest.approx(evaluate.image_miou(gt, pred, 21), abs=0.006)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless check: Chromium not installed (apt-get install chromium)")
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", (out / "index.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'data-ready="1"' in dom and dom.count("<tr>") == 7  # the script ran; header + 6 rows rendered


def test_browse_without_display_points_to_html(trained_run, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(errors.UserError, match="--browse needs a display.*--html"):
        evaluate.main(evaluate.get_args_parser().parse_args(["--weights", str(trained_run / "best.pth"), "--toy",
                                                             "--browse"]))


def test_comparison_of_several_models_matches_their_own_json(data_dir, trained_run, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    torch.manual_seed(1)
    torch.save(LightweightDeepLabV3(21).state_dict(), other / "best.pth")  # bare state_dict, no history
    (other / "timing.json").write_text(json.dumps({"backends": {"eager": {"latency_ms_median": 30.0},
                                                                "onnxruntime": {"latency_ms_median": 12.5}}}))
    flags = ["--toy", "--data-dir", data_dir, "--workers", "0", "--limit-val", "8"]
    out = tmp_path / "cmp"
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--runs", str(trained_run), str(other), "--comparison", str(out), *flags]))
    import csv
    with open(out / "comparison.csv") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 3 and len(rows[0]) == 6 + 21
    for row in rows[1:]:
        report = tmp_path / "own.json"
        evaluate.main(evaluate.get_args_parser().parse_args(["--weights", row[0], "--json", str(report), *flags]))
        own = json.loads(report.read_text())
        assert float(row[3]) == round(own["miou"], 2) and float(row[4]) == round(own["pixel_acc"], 2)
        for name, cell in zip(rows[0][6:], row[6:]):
            value = own["iou_per_class"][name[len("iou_"):]]
            assert (cell == "") == (value is None) and (value is None or float(cell) == round(value, 2))
    assert rows[1][1] == "baseline-student" and rows[1][5] == ""
    assert rows[2][1] == "student" and rows[2][5] == "12.50 (onnxruntime)"
    assert "| model | strategy |" in (out / "comparison.md").read_text()
    assert Image.open(out / "miou_vs_epoch.png").size[0] >= 500
    width, height = Image.open(out / "side_by_side.png").size
    assert (width, height) == (4 * 208, 4 * 208)  # 4 images x (image, truth, 2 models), 2.6 in at 80 dpi each
    with pytest.raises(errors.UserError, match="--json takes one model"):
        evaluate.main(evaluate.get_args_parser().parse_args(
            ["--runs", str(trained_run), str(other), "--json", str(tmp_path / "x.json"), *flags]))


def test_browser_keys(data_dir, trained_run):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.backend_bases import KeyEvent
    args = evaluate.get_args_parser().parse_args(["--weights", str(trained_run / "best.pth"), "--toy", "--data-dir",
                                                  data_dir, "--workers", "0", "--limit-val", "5"])
    result = evaluate.evaluate_weights(args, str(trained_run / "best.pth"), per_image=True)
    dataset, scores = result["dataset"], result["scores"]
    predictions = {k: evaluate.predict_image(result["model"], dataset, k, result["device"]) for k in range(5)}
    fig, state = evaluate.make_browser(dataset, predictions, scores, result["names"])

    def press(key):
        fig.canvas.callbacks.process("key_press_event", KeyEvent("key_press_event", fig.canvas, key))
        return fig._suptitle.get_text()
    assert press("right").startswith("2/5 ") and state["k"] == 1
    assert press("left").startswith("1/5 ") and press("left").startswith("5/5 ")  # wraps around
    title = press("w")
    worst = int(np.argmin(scores))
    assert state["k"] == worst and title.startswith(f"{worst + 1}/5 {dataset.cache.ids[worst]}")
    press("o")
    assert state["overlay"] and fig.axes[0].images[0].get_array().shape[:2] == predictions[worst].shape


def test_compiled_training_step_trains_like_eager(data_dir, tmp_path, monkeypatch):
    """--compile: the step (student forward, its loss, backward through AOTAutograd) is captured by torch.compile
    and trains the same epochs as eager within float rounding; the checkpoint keeps the plain module's names. The
    backend is aot_eager here (Inductor's code generation is PyTorch's, and takes minutes on 2 cores)."""
    compiled = []
    real_compile = torch.compile

    def compile_(fn, **kwargs):
        compiled.append(fn)
        return real_compile(fn, backend="aot_eager", **kwargs)
    monkeypatch.setattr(torch, "compile", compile_)
    histories = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        argv = small_run_args(data_dir, tmp_path / name, "--epochs", "1", "--image-size", "32", "--limit-train",
                              "16", "--lr", "1e-3", *extra)
        histories[name] = run_baseline(argv)
    assert len(compiled) == 1
    for key in ("train_loss", "val_loss", "val_miou"):
        assert histories["compiled"][0][key] == pytest.approx(histories["eager"][0][key], rel=1e-3, abs=1e-3), key
    ckpt = torch.load(tmp_path / "compiled" / "last.pth", weights_only=True)
    assert set(ckpt["model"]) == set(common.build_student(21, pretrained=False).state_dict())
