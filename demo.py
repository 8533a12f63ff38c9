"""The whole story on the offline toy set: fine-tune the teacher, train the baseline, response-KD, CWD and DIST
students (with --all also feature KD) on the same data for several seeds, and report each student's final val mIoU as
mean +- std over the seeds, the teacher as the reference. With --live-kd, also response KD with the live teacher on
the same seeds and the teacher-logit cache's fidelity under augmentation.

    python demo.py                       # ~11 min on 2 CPU cores; results in checkpoints/demo/
    python demo.py --all                 # then: + feature KD (live teacher, ~3 min more)
    python demo.py --live-kd             # then: + response KD with the live teacher, cache fidelity (~3 min more)
    python demo.py --real --data-dir ./data --image-size 256 --epochs 50 --teacher-epochs 0 --pretrained

Each run resumes if its folder already holds a checkpoint, so an interrupted demo continues where it stopped.
--teacher-epochs 0 skips fine-tuning and distils from torchvision's pretrained teacher.
"""
import argparse
import json
import os
import statistics

import torch

import common
import distill
import fileio
import flags
import plots
import train_baseline
import train_cwd
import train_dist
import train_feature_kd
import train_response_kd

STRATEGIES = {"baseline": (train_baseline, []), "response-kd": (train_response_kd, []), "cwd": (train_cwd, []),
              "dist": (train_dist, []), "feature-kd": (train_feature_kd, []),
              "response-kd-live": (train_response_kd, ["--no-teacher-cache"])}


def get_args_parser():
    parser = argparse.ArgumentParser(description="Teacher and students of every strategy, compared.")
    parser.add_argument("--data-dir", default="./data", help="data folder (default: %(default)s)")
    parser.add_argument("--real", action="store_true", help="use VOC 2012 under --data-dir instead of the toy set")
    parser.add_argument("--out-dir", default="checkpoints/demo", help="folder of all runs (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds of the students (default: %(default)s)")
    parser.add_argument("--epochs", type=flags.positive_int, default=10,
                        help="epochs of each student (default: %(default)s)")
    parser.add_argument("--teacher-epochs", type=flags.non_negative_int, default=12,
                        help="epochs of teacher fine-tuning; 0 = use the pretrained teacher as is "
                             "(default: %(default)s)")
    parser.add_argument("--image-size", type=flags.image_size, default=64, help="input size (default: %(default)s)")
    parser.add_argument("--batch-size", type=flags.positive_int, default=8, help="batch size (default: %(default)s)")
    parser.add_argument("--lr", type=flags.positive_float, default=2e-3,
                        help="Adam lr for every run; 2e-3 suits the from-scratch toy runs (default: %(default)s)")
    parser.add_argument("--limit-val", type=flags.positive_int, default=None,
                        help="validate every run on the first N val images only (a quick look; default: all)")
    parser.add_argument("--limit-train", type=flags.positive_int, default=None,
                        help="train every run on the first N training images only (a quick look; default: all)")
    parser.add_argument("--all", action="store_true",
                        help="also train feature KD (live teacher: about 2x the time of the other students)")
    parser.add_argument("--live-kd", action="store_true",
                        help="also train response KD with the live teacher (--no-teacher-cache) for every seed, and "
                             "measure the teacher-logit cache against the live teacher on augmented crops")
    parser.add_argument("--pretrained", action="store_true",
                        help="start from torchvision's pretrained weights (needs them downloaded)")
    return parser


def run_script(module, run_dir, argv):
    """Run one training script in-process; continue it if run_dir already holds a checkpoint."""
    resume = ["--resume"] if os.path.isfile(os.path.join(run_dir, "last.pth")) else []
    module.main(module.get_args_parser().parse_args(argv + ["--out-dir", run_dir] + resume))


def summarise(label, run_dirs):
    """One table row: final val mIoU / pixel acc as mean +- std over the runs (one per seed), epochs, epoch time."""
    histories = [json.load(open(os.path.join(d, "history.json"))) for d in run_dirs]
    final = [h[-1]["val_miou"] for h in histories]
    acc = [h[-1]["val_pixel_acc"] for h in histories]
    model = common.load_model(os.path.join(run_dirs[0], "best.pth")).model
    return {"model": label, "params_m": common.count_params(model) / 1e6, "seeds": len(run_dirs),
            "miou": statistics.mean(final), "miou_std": statistics.stdev(final) if len(final) > 1 else 0.0,
            "miou_runs": final, "pixel_acc": statistics.mean(acc), "epochs": len(histories[0]),
            "epoch_s": statistics.median(r["epoch_s"] for h in histories for r in h), "histories": histories}


def write_results(rows, out_dir):
    """results.md / results.json, miou_all.png (every run per epoch) and summary.png (final mIoU, error bars)."""
    table = ["| model | params (M) | seeds | final val mIoU (mean +- std) | per seed | pixel acc | epochs | "
             "median epoch (s) |", "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['params_m']:.2f} | {r['seeds']} | {r['miou']:.2f} +- {r['miou_std']:.2f} | "
              f"{', '.join(f'{v:.2f}' for v in r['miou_runs'])} | {r['pixel_acc']:.2f} | {r['epochs']} | "
              f"{r['epoch_s']:.1f} |" for r in rows]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    fileio.write_json(os.path.join(out_dir, "results.json"),
                      [{k: v for k, v in r.items() if k != "histories"} for r in rows])
    plots.plot_runs_miou({f"{r['model']} (seed {i})" if r["seeds"] > 1 else r["model"]: h
                           for r in rows for i, h in enumerate(r["histories"])},
                          os.path.join(out_dir, "miou_all.png"))
    plot_summary(rows, os.path.join(out_dir, "summary.png"))
    print("\n".join(table))
    return table


def plot_summary(rows, path):
    """Final val mIoU per student strategy (mean, std error bars, each seed as a dot), the teacher as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    students = [r for r in rows if r["model"] != "teacher"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = range(len(students))
    ax.bar(xs, [r["miou"] for r in students], yerr=[r["miou_std"] for r in students], capsize=6, color="tab:blue",
           alpha=0.7, label=f"student, mean +- std over {students[0]['seeds']} seeds")
    for x, r in zip(xs, students):
        ax.plot([x] * len(r["miou_runs"]), r["miou_runs"], "k.", label="one seed" if x == 0 else None)
    teacher = [r for r in rows if r["model"] == "teacher"]
    if teacher:
        ax.axhline(teacher[0]["miou"], color="tab:red", linestyle="--", label=f"teacher ({teacher[0]['miou']:.1f})")
    ax.set_xticks(list(xs), [r["model"] for r in students])
    ax.set(ylabel="final val mIoU (%)", title="Students after the same epochs, data and seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def measure_cache_fidelity(args, teacher_path, out_dir):
    """The teacher-logit cache against the live teacher on augmented crops of the training set (fidelity.json)."""
    parsed = train_response_kd.get_args_parser().parse_args(
        [f"--image-size={args.image_size}", "--data-dir", args.data_dir, "--workers", "0"]
        + ([] if args.real else ["--toy"])
        + ([] if args.limit_train is None else [f"--limit-train={args.limit_train}"]))
    data = common.data_config(parsed)
    dataset = common.build_datasets(data, splits=("train",))["train"]
    cpu = torch.device("cpu")
    teacher = distill.build_frozen_teacher(teacher_path, data.num_classes, cpu, "fp32")
    cache = distill.TeacherLogitCache(teacher, dataset, cpu, args.batch_size, 0, "fp32")
    fidelity = {f"T={t:g}": distill.cache_fidelity(teacher, dataset, cache, cpu, "fp32", args.batch_size, t)
                for t in (1.0, 2.0)}
    fileio.write_json(os.path.join(out_dir, "fidelity.json"), fidelity)
    for t, f in fidelity.items():
        print(f"teacher-logit cache vs live teacher on augmented training crops ({t}): argmax agreement "
              f"{100 * f['argmax_agreement']:.2f}%, mean KL(live || cached) {f['kl_live_cached']:.4f} over "
              f"{f['pixels']:,} pixels")
    return fidelity


def main(args):
    fileio.check_output_dir(args.out_dir, "--out-dir")
    seeds = [int(s) for s in args.seeds.split(",")]
    shared = ["--data-dir", args.data_dir, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
              "--lr", str(args.lr)] + ([] if args.real else ["--toy"])
    shared += ([] if args.pretrained else ["--no-pretrained"]) \
        + ([] if args.limit_train is None else ["--limit-train", str(args.limit_train)]) \
        + ([] if args.limit_val is None else ["--limit-val", str(args.limit_val)])
    runs, teacher_flag = {}, []
    if args.teacher_epochs > 0:
        runs["teacher"] = [os.path.join(args.out_dir, "teacher")]
        run_script(train_baseline, runs["teacher"][0],
                   shared + ["--model", "teacher", "--epochs", str(args.teacher_epochs), "--seed", "0"])
        teacher_flag = ["--teacher-weights", os.path.join(runs["teacher"][0], "best.pth")]
    # feature KD runs its teacher live (2x a baseline epoch): --all adds it, so that the default demo keeps to ~10 min
    optional = {"feature-kd": args.all, "response-kd-live": args.live_kd}
    names = [n for n in STRATEGIES if optional.get(n, True)]
    for name in names:
        module, extra = STRATEGIES[name]
        runs[name] = [os.path.join(args.out_dir, f"{name}_seed{seed}") for seed in seeds]
        for seed, run_dir in zip(seeds, runs[name]):
            run_script(module, run_dir, shared + ["--epochs", str(args.epochs), "--seed", str(seed)] + extra
                       + ([] if module is train_baseline else teacher_flag))
    rows = [summarise(name, dirs) for name, dirs in runs.items()]
    write_results(rows, args.out_dir)
    if args.live_kd and args.teacher_epochs > 0:  # the cache-vs-live study: the cache's fidelity beside the students
        measure_cache_fidelity(args, teacher_flag[1], args.out_dir)
    print(f"table: {args.out_dir}/results.md, plots: {args.out_dir}/summary.png and miou_all.png, "
          f"per-run plots in each run folder")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
