"""The whole story on the offline toy set: fine-tune the teacher, train baseline / response-KD / feature-KD
students with the same epochs, data and seed, evaluate all four, print one table and draw the plots.

    python demo.py                       # ~10 min on 2 CPU cores; results in checkpoints/demo/
    python demo.py --data-dir ./data --image-size 256 --epochs 50 --teacher-epochs 0   # real VOC, pretrained teacher

Each step resumes if its run folder already holds a checkpoint, so an interrupted demo continues.
--teacher-epochs 0 skips fine-tuning and distils from torchvision's pretrained teacher.
"""
import argparse
import json
import os
import statistics

import common
import engine
import evaluate
import train_baseline
import train_feature_kd
import train_response_kd


def get_args_parser():
    parser = argparse.ArgumentParser(description="Teacher, baseline, response-KD and feature-KD students, compared.")
    parser.add_argument("--data-dir", default="./data", help="data folder (default: %(default)s)")
    parser.add_argument("--real", action="store_true", help="use VOC 2012 under --data-dir instead of the toy set")
    parser.add_argument("--out-dir", default="checkpoints/demo", help="folder of the four runs (default: %(default)s)")
    parser.add_argument("--epochs", type=common.positive_int, default=5,
                        help="epochs of each student (default: %(default)s)")
    parser.add_argument("--teacher-epochs", type=int, default=2,
                        help="epochs of teacher fine-tuning; 0 = use the pretrained teacher as is "
                             "(default: %(default)s)")
    parser.add_argument("--image-size", type=common.positive_int, default=96, help="input size (default: %(default)s)")
    parser.add_argument("--batch-size", type=common.positive_int, default=8, help="batch size (default: %(default)s)")
    parser.add_argument("--lr", type=common.positive_float, default=2e-3,
                        help="Adam lr for every run; 2e-3 suits the from-scratch toy runs (default: %(default)s)")
    parser.add_argument("--pretrained", action="store_true",
                        help="start from torchvision's pretrained weights (needs them downloaded)")
    parser.add_argument("--seed", type=int, default=0, help="seed shared by every run (default: %(default)s)")
    return parser


def run(module, run_dir, flags):
    """Run one training script in-process; continue it if run_dir already holds a checkpoint."""
    resume = ["--resume"] if os.path.isfile(os.path.join(run_dir, "last.pth")) else []
    module.main(module.get_args_parser().parse_args(flags + ["--out-dir", run_dir] + resume))


def main(args):
    shared = ["--data-dir", args.data_dir, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
              "--lr", str(args.lr), "--seed", str(args.seed)] + ([] if args.real else ["--toy"]) \
        + ([] if args.pretrained else ["--no-pretrained"])
    runs = {}
    if args.teacher_epochs > 0:
        runs["teacher"] = os.path.join(args.out_dir, "teacher")
        run(train_baseline, runs["teacher"], shared + ["--model", "teacher", "--epochs", str(args.teacher_epochs)])
        teacher_flag = ["--teacher-weights", os.path.join(runs["teacher"], "best.pth")]
    else:
        teacher_flag = []
    student = shared + ["--epochs", str(args.epochs)]
    for name, module, extra in (("baseline", train_baseline, []), ("response-kd", train_response_kd, teacher_flag),
                                ("feature-kd", train_feature_kd, teacher_flag)):
        runs[name] = os.path.join(args.out_dir, name)
        run(module, runs[name], student + extra)

    rows = []
    for name, run_dir in runs.items():
        metrics_path = os.path.join(run_dir, "val_metrics.json")
        eval_flags = ["--weights", os.path.join(run_dir, "best.pth"), "--data-dir", args.data_dir,
                      "--json", metrics_path] + ([] if args.real else ["--toy"])
        evaluate.main(evaluate.get_args_parser().parse_args(eval_flags))
        with open(metrics_path) as f:
            metrics = json.load(f)
        with open(os.path.join(run_dir, "history.json")) as f:
            history = json.load(f)
        model = common.load_model(os.path.join(run_dir, "best.pth")).model
        rows.append({"model": name, "params_m": common.count_params(model) / 1e6, "miou": 100 * metrics["miou"],
                     "pixel_acc": 100 * metrics["pixel_acc"], "epochs": len(history),
                     "epoch_s": statistics.median(h["epoch_s"] for h in history), "history": history})
    table = ["| model | params (M) | val mIoU | pixel acc | epochs | median epoch time (s) |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['params_m']:.2f} | {r['miou']:.2f} | {r['pixel_acc']:.2f} | {r['epochs']} | "
              f"{r['epoch_s']:.1f} |" for r in rows]
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    engine.plot_runs_miou({r["model"]: r["history"] for r in rows}, os.path.join(args.out_dir, "miou_all.png"))
    print("\n".join(table))
    print(f"table: {args.out_dir}/results.md, plot: {args.out_dir}/miou_all.png, per-run plots in each run folder")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
