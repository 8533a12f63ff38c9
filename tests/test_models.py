"""Student/teacher construction, offline pretrained-weight loading, reading checkpoints."""
import os

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import mobilenet_v3_large
from torchvision.models.segmentation import fcn_resnet50

import common
import errors
import voc
from student_model import LightweightDeepLabV3, upsample_bilinear


def test_student_parameter_count_and_shapes():
    model = LightweightDeepLabV3(21)
    assert common.count_params(model) == 3_813_957  # ~3.8M: 2.97M backbone + 0.84M head
    model.eval()
    logits, feats = model(torch.randn(2, 3, 96, 128), return_features=True)
    assert logits.shape == (2, 21, 96, 128)
    assert feats["stage8"].shape == (2, 40, 12, 16)
    assert feats["stage16"].shape == (2, 112, 6, 8)
    assert feats["head"].shape == (2, 256, 6, 8)
    assert LightweightDeepLabV3(5)(torch.randn(1, 3, 64, 64)).shape == (1, 5, 64, 64)


@pytest.mark.parametrize("shape,size", [((2, 21, 16, 16), (256, 256)), ((1, 21, 32, 24), (500, 375)),
                                        ((3, 4, 7, 9), (13, 100)), ((1, 2, 20, 20), (7, 5)), ((1, 3, 6, 6), (6, 6))])
def test_matrix_upsampling_equals_bilinear_interpolate(shape, size):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    expected = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    got = upsample_bilinear(y, size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(y.grad, x.grad, rtol=0, atol=1e-12)


def _hub_checkpoint(filename):
    path = os.path.join(os.environ["TORCH_HOME"], "hub", "checkpoints", filename)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def test_pretrained_student_backbone_loads_offline_from_torch_home():
    reference = mobilenet_v3_large().state_dict()
    torch.save(reference, _hub_checkpoint("mobilenet_v3_large-8738ca79.pth"))
    student = common.build_student(21, pretrained=True)
    for k, v in student.backbone.state_dict().items():
        torch.testing.assert_close(v, reference["features." + k], rtol=0, atol=0)


def test_pretrained_teacher_loads_offline_and_can_change_class_count():
    reference = fcn_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True).state_dict()
    torch.save(reference, _hub_checkpoint("fcn_resnet50_coco-1167a1af.pth"))
    teacher = common.build_teacher(21, pretrained=True)
    torch.testing.assert_close(teacher.state_dict()["classifier.4.weight"], reference["classifier.4.weight"])
    torch.testing.assert_close(teacher.state_dict()["backbone.layer3.2.conv2.weight"],
                               reference["backbone.layer3.2.conv2.weight"])
    teacher5 = common.build_teacher(5, pretrained=True)
    assert teacher5.classifier[4].out_channels == 5
    torch.testing.assert_close(teacher5.state_dict()["backbone.conv1.weight"], reference["backbone.conv1.weight"])
    teacher.eval()
    logits, feats = teacher(torch.randn(1, 3, 64, 64), return_features=True)
    assert logits.shape == (1, 21, 64, 64) and feats["layer3"].shape == (1, 1024, 8, 8)
    assert feats["layer4"].shape == (1, 2048, 8, 8)


def test_missing_pretrained_weights_name_the_file(monkeypatch):
    monkeypatch.setattr(voc, "DOWNLOAD_TIMEOUT_S", 3)
    with pytest.raises(errors.UserError) as e:
        common.build_student(21, pretrained=True)
    msg = str(e.value)
    assert "mobilenet_v3_large-8738ca79.pth" in msg and os.environ["TORCH_HOME"] in msg and "--no-pretrained" in msg


def test_corrupt_pretrained_file_is_a_clear_error():
    with open(_hub_checkpoint("mobilenet_v3_large-8738ca79.pth"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(errors.UserError, match="mobilenet_v3_large-8738ca79.pth"):
        common.build_student(21, pretrained=True)


def test_load_model_detects_architecture_and_rejects_bad_files(tmp_path):
    student = LightweightDeepLabV3(7)
    bare = tmp_path / "bare.pth"
    torch.save({"module." + k: v for k, v in student.state_dict().items()}, bare)  # DDP-style prefix
    model, arch, n, _ = common.load_model(str(bare))
    assert (arch, n) == ("student", 7)
    torch.testing.assert_close(model.classifier.weight, student.classifier.weight)
    teacher_ckpt = tmp_path / "teacher.pth"
    teacher = common.Teacher(3).eval()
    torch.save({"model": {k: v.half() if v.is_floating_point() else v for k, v in teacher.state_dict().items()},
                "arch": "teacher"}, teacher_ckpt)  # an fp16 file: loaded as fp32, every tensor from the file
    loaded, arch, n, _ = common.load_model(str(teacher_ckpt))
    assert (arch, n) == ("teacher", 3)
    for (name, a), b in zip(loaded.state_dict().items(), teacher.state_dict().values()):
        assert a.device.type == "cpu" and a.dtype == b.dtype and torch.equal(a, b.half().to(b.dtype)), name
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), teacher.half().float()(x))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(bare.read_bytes()[:5000])
    with pytest.raises(errors.UserError, match="truncated.pth is not a readable PyTorch checkpoint"):
        common.load_model(str(truncated))
    junk = tmp_path / "junk.pth"  # not "pickled Python objects": torch.load's message for any non-zip bytes
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(errors.UserError, match=r"junk.pth is not a readable PyTorch checkpoint \(neither"):
        common.load_model(str(junk))
    legacy = tmp_path / "legacy.pth"  # torch.save's pre-1.6 format still loads
    torch.save({"module." + k: v for k, v in student.state_dict().items()}, legacy,
               _use_new_zipfile_serialization=False)
    assert common.load_model(str(legacy))[1:3] == ("student", 7)
    other = tmp_path / "other.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(errors.UserError, match="unknown architecture"):
        common.load_model(str(other))
    with pytest.raises(errors.UserError, match="no such file"):
        common.load_model(str(tmp_path / "nope.pth"))
