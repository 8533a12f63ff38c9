"""Multi-scale + flip evaluation (evaluate.py --scales/--flip): --scales 1.0 is today's evaluation bit for bit; several
scales with flip match an independent computation (PIL + F.interpolate + a float64 copy of the model + numpy mIoU)."""
import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import engine
import errors
import evaluate
from conftest import assert_flag_refused

SCALES, SIZE, IMAGES = (0.5, 1.0, 1.5), 32, 4


@pytest.fixture(scope="module")
def student_weights(tmp_path_factory):
    """A randomly initialised student saved as a bare state_dict, its BatchNorm statistics set from one batch of noise
    and its classifier drawn from N(0, 1): at init its logits are ~1e-10 (one class everywhere, near-ties), now they
    vary over the image, so that scales and flips change the predictions."""
    torch.manual_seed(0)
    model = common.build_student(21, pretrained=False)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0  # the running statistics become the batch's
    with torch.no_grad():
        model.classifier.weight.normal_(0, 1)
        model.classifier.bias.zero_()
        model.train()(torch.randn(8, 3, 48, 48))
    model.eval()
    path = tmp_path_factory.mktemp("weights") / "student.pth"
    torch.save(model.state_dict(), path)
    return str(path), model


def run_evaluate(weights, data_dir, out, *extra):
    args = evaluate.get_args_parser().parse_args(
        ["--weights", weights, "--toy", "--data-dir", data_dir, "--image-size", str(SIZE), "--limit-val", str(IMAGES),
         "--workers", "0", "--batch-size", "3", "--json", str(out / "m.json"), "--save-predictions", str(out / "p"),
         *extra])
    evaluate.main(args)
    report = json.loads((out / "m.json").read_text())
    preds = {f[:-4]: np.array(Image.open(out / "p" / f)) for f in sorted(os.listdir(out / "p"))}
    return report, preds


def test_scale_one_is_the_single_scale_evaluation_bit_for_bit(student_weights, data_dir, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    default, preds_default = run_evaluate(student_weights[0], data_dir, tmp_path / "a")
    one, preds_one = run_evaluate(student_weights[0], data_dir, tmp_path / "b", "--scales", "1.0")
    assert default["scales"] == one["scales"] == [1.0] and default["flip"] is one["flip"] is False
    for key in ("miou", "pixel_acc", "mean_class_acc", "iou_per_class", "num_images"):
        assert default[key] == one[key], key
    assert preds_default.keys() == preds_one.keys() and len(preds_default) == IMAGES
    for k in preds_default:
        assert np.array_equal(preds_default[k], preds_one[k])
    # and the training loop's validation (a dataset without scales) predicts the same
    data = common.data_config(evaluate.get_args_parser().parse_args(
        ["--toy", "--data-dir", data_dir, "--image-size", str(SIZE), "--limit-val", str(IMAGES), "--workers", "0"]))
    dataset = common.build_datasets(data, splits=("val",), augment_train=False)["val"]
    seen = {}
    engine.compute_metrics(student_weights[1], engine.make_loader(dataset, 3, 0), torch.device("cpu"), 21,
                           on_prediction=lambda k, pred: seen.update({dataset.cache.ids[k]: pred}))
    assert seen.keys() == preds_default.keys()
    assert all(np.array_equal(seen[k], preds_default[k]) for k in seen)


def independent_probabilities(model, image_u8, scales, flip):
    """Average class probabilities (C, H, W) in float64: the image resized bilinearly (align_corners=False, no
    antialias: the same sampling as the repo's grid) to round(SIZE * s), normalised, the model run, each output
    resized back bilinearly to H x W, softmaxed, averaged."""
    h, w = image_u8.shape[:2]
    x = torch.from_numpy(image_u8.astype(np.float64) / 255).permute(2, 0, 1)[None]
    mean = torch.tensor(common.IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(common.IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    total, n = 0, 0
    for s in scales:
        side = int(round(SIZE * s))
        xs = (F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False) - mean) / std
        for mirrored in ((False, True) if flip else (False,)):
            with torch.no_grad():
                logits = model(torch.flip(xs, dims=[3]) if mirrored else xs)
            if mirrored:
                logits = torch.flip(logits, dims=[3])
            total = total + torch.softmax(F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False), 1)
            n += 1
    return (total / n)[0]


def numpy_miou(pairs, num_classes=21):
    """mIoU (percent) over classes present in ground truth or prediction, from a numpy confusion matrix."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for mask, pred in pairs:
        valid = mask != 255
        conf += np.bincount(num_classes * mask[valid].astype(np.int64) + pred[valid],
                            minlength=num_classes ** 2).reshape(num_classes, num_classes)
    tp, union = np.diag(conf), conf.sum(0) + conf.sum(1) - np.diag(conf)
    return 100 * float(np.mean(tp[union > 0] / union[union > 0]))


def test_multiscale_flip_matches_an_independent_computation(student_weights, data_dir, toy_root, tmp_path):
    report, preds = run_evaluate(student_weights[0], data_dir, tmp_path, "--scales", ",".join(map(str, SCALES)),
                                 "--flip")
    assert report["scales"] == list(SCALES) and report["flip"] is True and report["num_images"] == IMAGES
    model64 = copy.deepcopy(student_weights[1]).double().eval()
    pairs, agree, pixels, changed = [], 0, 0, 0
    for image_id, pred in preds.items():
        image = np.array(Image.open(os.path.join(toy_root, "JPEGImages", image_id + ".jpg")).convert("RGB"))
        mask = np.array(Image.open(os.path.join(toy_root, "SegmentationClass", image_id + ".png")))
        prob = independent_probabilities(model64, image, SCALES, flip=True)
        top2 = prob.topk(2, dim=0).values
        clear = ((top2[0] - top2[1]) > 1e-5).numpy()  # not a near-tie that float32 rounding may decide otherwise
        expected = prob.argmax(0).numpy()
        assert pred.shape == mask.shape
        assert np.array_equal(pred[clear], expected[clear])
        agree, pixels = agree + int((pred == expected).sum()), pixels + pred.size
        single = independent_probabilities(model64, image, (1.0,), flip=False).argmax(0).numpy()
        changed += int((single != expected).sum())
        pairs.append((mask, expected))
    assert agree >= 0.999 * pixels
    assert changed > 0  # scales and flips really changed predictions: the test tells MS+flip from single scale
    assert report["miou"] == pytest.approx(numpy_miou(pairs), abs=0.05)


def test_scales_are_checked(student_weights, data_dir, tmp_path, capsys):
    assert_flag_refused(evaluate, ["--scales", "1.0,x"], capsys)
    assert_flag_refused(evaluate, ["--scales", "1.0,1.0"], capsys)
    assert_flag_refused(evaluate, ["--scales", "0,1"], capsys)
    with pytest.raises(SystemExit) as e:  # a typo for 1.25: 32,000-px inputs at 256 px, refused with the reason
        evaluate.get_args_parser().parse_args(["--scales", "0.5,1,125"])
    assert e.value.code == 2 and "--scales: must be distinct numbers in (0, 4], got 0.5,1,125 (a scale s costs s^2" \
        in capsys.readouterr().err
    with pytest.raises(errors.UserError, match=r"--scales 0.25 at --image-size 32 gives inputs under 16 px"):
        run_evaluate(student_weights[0], data_dir, tmp_path, "--scales", "0.25,1")
