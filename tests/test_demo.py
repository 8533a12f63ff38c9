"""demo.py end to end on a tiny budget (a preset of compare.py): every run, the table against the runs' own
history.json, the plots, and the cache fidelity with --live-kd. (The mean +- std over seeds: test_compare.py.)"""
import json

from PIL import Image

import demo
import methods


def test_demo_table_summarises_every_run(data_dir, tmp_path):
    out = tmp_path / "demo"
    argv = ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "1", "--teacher-epochs", "1",
            "--image-size", "32", "--limit-train", "8", "--limit-val", "4", "--seeds", "3", "--live-kd"]
    rows = demo.main(demo.get_args_parser().parse_args(argv))
    # the baseline and the methods reading the logit cache, then the live-teacher variant (--live-kd); the feature
    # methods (live teacher) only with --all: their scripts are covered in test_distillation
    names = [n for n, m in methods.registry().items() if m.TEACHER in ("none", "logits")] + ["response-kd-live"]
    assert [r["model"] for r in rows] == names and {"baseline", "response-kd", "cwd", "dist", "lskd"} <= set(names)
    report = json.loads((out / "results.json").read_text())
    results = {r["model"]: r for r in report["rows"]}
    assert report["teacher"]["miou"] == json.loads((out / "teacher" / "history.json").read_text())[-1]["val_miou"]
    for name in names:
        final = json.loads((out / f"{name}_seed3" / "history.json").read_text())[-1]["val_miou"]
        assert results[name]["miou_runs"] == [final] and results[name]["seeds"] == 1
        assert results[name]["miou"] == final and results[name]["miou_std"] is None
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| model | params (M) | seeds | final val mIoU (mean +- std) |")
    rows_end = 3 + len(names)
    assert [line.split(" | ")[0] for line in table[2:rows_end]] == ["| teacher"] + [f"| {n}" for n in names]
    assert table[rows_end] == ""
    for name in ("summary.png", "miou_all.png"):
        assert Image.open(out / name).size[0] >= 500
    fidelity = json.loads((out / "fidelity.json").read_text())
    assert set(fidelity) == {"T=1", "T=2"} and all(0 <= f["argmax_agreement"] <= 1 for f in fidelity.values())
    assert fidelity["T=1"]["argmax_agreement"] == fidelity["T=2"]["argmax_agreement"]  # T does not move the argmax


def test_demo_takes_the_data_and_weights_flags_every_script_takes(capsys):
    """Issue 26 item 8: demo.py's --real/--pretrained were its own; now --toy/--no-toy and --pretrained/--no-pretrained
    mean what --toy and --no-pretrained mean everywhere (the toy set and random weights stay its defaults)."""
    def comparison(*argv):
        ns = demo.compare_args(demo.get_args_parser().parse_args(list(argv)))
        return ns.toy, ns.no_pretrained
    assert comparison() == comparison("--toy", "--no-pretrained") == (True, True)
    assert comparison("--no-toy", "--pretrained") == (False, False)
    assert comparison("--real") == (False, True) and "--real is deprecated" in capsys.readouterr().err
