"""Compare strategies fairly: every strategy and the baseline trained with the same data, recipe and seeds, in one
table with the spread over seeds and each strategy's paired difference against the baseline of the same seed.

    python compare.py --toy --strategies baseline,response-kd --seeds 0,1 --epochs 10 --teacher-epochs 12 \\
        --no-pretrained --lr 2e-3 --image-size 64 --out-dir checkpoints/compare_toy   # demo.py's recipe, ~9 min
    python compare.py --data-dir ./data --strategies baseline,response-kd,cwd,dist --seeds 0,1,2 --epochs 50 \\
        --scales 0.5,0.75,1.0,1.25,1.5,1.75 --flip --out-dir checkpoints/compare_voc   # one GPU, torchvision's teacher
    python compare.py --toy --no-pretrained --lr 2e-3 --teacher-epochs 4 --grid response-kd:--tau=1,2,4 ...   # a sweep

Every recipe flag (data, --epochs, --batch-size, --lr, --amp, ...) goes to every run alike; each strategy's own flags
keep their defaults unless --grid sweeps one (each value its own row). The teacher is --teacher-weights, or fine-tuned
once here (--teacher-epochs N, OUT_DIR/teacher), or torchvision's pretrained one. Runs live in OUT_DIR/<row>_seed<S>.
From random weights (--no-pretrained, as on the toy set) the default --lr 1e-4 hardly moves in a few epochs (every
model predicts one class everywhere): the toy examples use 2e-3, and a table whose models predict one class says so.

Running the same command again finishes the table: a finished run (same settings) is never trained again, an
interrupted one resumes where it stopped (SIGINT/SIGTERM leave every run resumable). A run that fails is reported in
its row and the comparison goes on; the command then exits 1.

Output in OUT_DIR: results.md and results.json (final-epoch val mIoU, mean +- std over seeds and per seed; best-epoch
mIoU, chosen on val; paired difference against the baseline; epoch time against the baseline's; with --scales/--flip
the final model's multi-scale mIoU), summary.png and miou_all.png.
"""
import argparse
import dataclasses
import os
import statistics
import time
import traceback

import torch

import common
import distill
import distributed
import engine
import errors
import fileio
import flags
import methods
import plots

STRATEGIES = methods.strategies()  # strategy -> (its method, its flags set otherwise than the method's defaults)
BASELINE = "baseline"
RUN_FLAGS = {"out_dir", "resume", "seed", "init_weights"}  # set by the comparison per run, never swept


def seed_list(text):
    seeds = [flags.seed_value(s) for s in text.split(",")]  # each in numpy's seed range
    if len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"must be distinct, got {text}")
    return seeds


def get_args_parser():
    parser = argparse.ArgumentParser(description="Train strategies x seeds with one recipe and compare them.")
    parser.add_argument("--strategies", type=flags.name_list(STRATEGIES), default="baseline,response-kd,cwd,dist",
                        help=f"comma-separated, from {', '.join(STRATEGIES)}; or all (default: %(default)s)")
    parser.add_argument("--seeds", type=seed_list, default="0,1,2", help="comma-separated seeds; every strategy "
                        "trains once per seed (default: %(default)s)")
    parser.add_argument("--out-dir", default="checkpoints/compare", help="folder of every run and the results "
                        "(default: %(default)s)")
    parser.add_argument("--teacher-epochs", type=flags.non_negative_int, default=0,
                        help="fine-tune the teacher for N epochs first (OUT_DIR/teacher, seed of the first --seeds) "
                             "and distil from it; 0: --teacher-weights, else torchvision's pretrained teacher "
                             "(default: %(default)s)")
    parser.add_argument("--grid", action="append", default=[], metavar="STRATEGY:--FLAG=V1,V2",
                        help="sweep one flag of a strategy, each value its own row, e.g. "
                             "response-kd:--tau=1,2,4; a switch as 0,1, e.g. cwd:--no-teacher-cache=0,1 (repeatable)")
    engine.add_recipe_args(parser, seed=False)
    distill.add_teacher_args(parser)
    flags.add_multiscale_args(parser)
    return parser


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: a strategy, or one value of a --grid sweep of it."""
    label: str
    strategy: str
    overrides: tuple = ()  # ((dest, value), ...) beyond STRATEGIES' own


def parse_grid(text):
    """--grid STRATEGY:--flag=v1,v2 -> rows; each value checked by the strategy script's own parser."""
    strategy, _, assignment = text.partition(":")
    flag, _, values = assignment.partition("=")
    dest = flag[2:].replace("-", "_")
    if strategy not in STRATEGIES or not flag.startswith("--") or not values:
        raise errors.UserError(f"--grid {text}: expected STRATEGY:--FLAG=V1,V2,... with STRATEGY one of "
                               f"{', '.join(STRATEGIES)}")
    parser = methods.get_args_parser(STRATEGIES[strategy][0])
    action = next((a for a in parser._actions if flag in a.option_strings), None)
    if action is None or action.dest in RUN_FLAGS:
        raise errors.UserError(f"--grid {text}: {flag} is not a flag {strategy} can sweep (see its script's --help)")
    if action.dest == "teacher_weights":
        raise errors.UserError(f"--grid {text}: --teacher-weights is the comparison's own flag (one teacher per table, "
                               f"its checksum kept with each run); run one comparison per teacher, each with its own "
                               f"--teacher-weights and --out-dir")
    dest, name = action.dest, action.dest.replace("_", "-")  # a deprecated name is swept (and labelled) as the new one
    if action.nargs == 0:  # a switch is labelled as given: --no-channels-last=1 is no-channels-last=1
        name = flag[2:]
    parser.exit_on_error = False  # a bad value: one line naming --grid, not the strategy script's usage
    rows, seen = [], {}
    for value in values.split(","):
        try:
            parsed = getattr(parser.parse_args(grid_argv(action, flag, value, text)), dest)
        except argparse.ArgumentError as e:
            raise errors.UserError(f"--grid {text}: {e}") from None
        if parsed in seen:  # two rows would share one run folder
            raise errors.UserError(f"--grid {text}: {value} repeats {seen[parsed]}; give each value once")
        seen[parsed] = value
        rows.append(Row(f"{strategy} {name}={value}", strategy, ((dest, parsed),)))
    return rows


SWITCH_VALUES = {**dict.fromkeys(("1", "true", "on", "yes"), True), **dict.fromkeys(("0", "false", "off", "no"), False)}


def grid_argv(action, flag, value, text):
    """The command line that sets one grid value: --flag=V, or for a switch (a flag that takes no value, such as
    --no-teacher-cache) V one of SWITCH_VALUES: the switch given or not (a --x/--no-x pair: the one or the other)."""
    if action.nargs != 0:
        return [f"{flag}={value}"]
    if value.lower() not in SWITCH_VALUES:
        raise errors.UserError(f"--grid {text}: {flag} is a switch; sweep it as {flag}=0,1 (or off,on / false,true), "
                               f"got {value}")
    if isinstance(action, argparse.BooleanOptionalAction):
        given = flag if SWITCH_VALUES[value.lower()] else next(o for o in action.option_strings if o != flag)
        return [given]
    return [flag] if SWITCH_VALUES[value.lower()] else []


def plan_rows(args):
    grids = [row for text in args.grid for row in parse_grid(text)]
    missing = sorted({r.strategy for r in grids} - set(args.strategies))
    if missing:
        raise errors.UserError(f"--grid sweeps {', '.join(missing)}, which --strategies leaves out; add it there")
    return [row for s in args.strategies for row in ([r for r in grids if r.strategy == s] or [Row(s, s)])]


def run_dir(args, label, seed):
    return os.path.join(args.out_dir, f"{label.replace(' ', '_')}_seed{seed}")


def run_args(args, method, overrides, out_dir, seed, teacher):
    """The namespace a method's main() takes: its defaults, the comparison's recipe, the row's overrides."""
    ns = methods.get_args_parser(method).parse_args([])
    for dest in engine.recipe_dests():
        setattr(ns, dest, getattr(args, dest))
    if hasattr(ns, "teacher_weights"):
        ns.teacher_weights, ns.teacher_dtype = teacher, args.teacher_dtype
    for dest, value in overrides:
        setattr(ns, dest, value)
    ns.out_dir, ns.seed = out_dir, seed
    ns.resume = "" if os.path.isfile(os.path.join(out_dir, "last.pth")) else None
    return ns


def finished_history(ns):
    """The history of the run in ns.out_dir if it finished ns.epochs epochs with these settings; None if it has
    (more) training to do; UserError if the folder holds another experiment."""
    path = os.path.join(ns.out_dir, "history.json")
    if not (ns.resume == "" and os.path.isfile(path)):
        return None
    history = engine.read_history(path)
    try:
        saved = fileio.read_json(os.path.join(ns.out_dir, "config.json"))
    except ValueError as e:
        raise errors.UserError(f"{e}; delete {ns.out_dir} to train this run again") from None
    current = {k: v for k, v in vars(ns).items() if v is not None}
    engine.check_same_experiment(saved, current, ns.out_dir, what="run folder",
                                 advice="give this comparison another --out-dir")
    if len(history) > ns.epochs:
        raise errors.UserError(f"run folder {ns.out_dir} holds {len(history)} epochs, more than --epochs {ns.epochs}; "
                               f"give this comparison another --out-dir")
    return history if len(history) == ns.epochs else None


def eta(runs):
    """Time left: each unfinished run's remaining epochs at its strategy's median epoch time so far (a student
    strategy not timed yet: the students' median; the teacher's epochs are several times a student's); None until a
    student epoch has been timed."""
    known = {}
    for run in runs:
        known.setdefault(run["strategy"], []).extend(r["epoch_s"] for r in run.get("history") or [])
    students = [s for name, v in known.items() if name != "teacher" for s in v]
    if not students:
        return None
    left = 0.0
    for run in runs:
        if run["status"] == "todo":
            per_epoch = statistics.median(known.get(run["strategy"]) or students)
            left += per_epoch * (run["epochs"] - len(run.get("history") or []))
    return left


def format_seconds(s):
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


def train_run(run, runs, args, index, total):
    """Train (or resume, or keep) one run; its history or error lands in `run`."""
    left = eta(runs)
    print(f"\n== run {index} of {total}: {run['label']} seed {run['seed']} -> {run['dir']} "
          f"({'resuming' if run['ns'].resume == '' else 'new'}); "
          f"time left: {format_seconds(left) if left is not None else 'known after the first student epoch'}",
          flush=True)
    try:
        methods.main(run["method"], run["ns"])
        run["history"] = engine.read_history(os.path.join(run["dir"], "history.json"))
        run["status"] = "done"
    except errors.Interrupted as e:
        saved = str(e).split("; continue with")[0]  # the script's own advice (--resume) is not compare.py's
        raise errors.Interrupted(f"{saved}\ninterrupted during run {index} of {total} ({run['label']} seed "
                                 f"{run['seed']}); run the same compare.py command again to finish the table "
                                 f"(finished runs are kept, this one resumes)", e.signal_name) from None
    except errors.UserError as e:
        fail(run, str(e))
    except Exception as e:  # a bug or an out-of-memory in one run must not cost the others: report it in its row
        traceback.print_exc()
        fail(run, f"{type(e).__name__}: {e}")


def check_teacher(run, teacher_weights):
    """A distilled run keeps the teacher file it started with: its checksum is recorded in the run folder at the start
    (teacher_file.json) and compared whenever the run is resumed or kept, so a teacher fine-tuned further or replaced
    under the same path never mixes into a finished row. False (the run failed) on a mismatch."""
    if run["strategy"] in (BASELINE, "teacher") or teacher_weights is None:
        return True
    if not os.path.isfile(teacher_weights):
        fail(run, f"the teacher {teacher_weights} is missing")
        return False
    path, current = os.path.join(run["dir"], "teacher_file.json"), fileio.file_record(teacher_weights)
    if not os.path.isfile(path):
        fileio.write_json(path, current)
    elif fileio.read_json(path) != current:
        fail(run, f"run folder {run['dir']} was distilled from another {teacher_weights} (its checksum has changed "
                  f"since the run started); give this comparison another --out-dir")
        return False
    return True


def fail(run, message):
    run["status"], run["error"] = "failed", message.splitlines()[0] if message else "failed"
    print(f"run {run['label']} seed {run['seed']} FAILED: {run['error']}", flush=True)


def final_evaluation(args, weights, ns, device):
    """The final model's val metrics at --scales (with --flip); the model: a checkpoint path, or None for torchvision's
    pretrained teacher. Cached beside a run's checkpoint as final_eval.json for these scales/flip."""
    data = common.data_config(ns)
    dataset = common.build_datasets(data, ("val",), augment_train=False, scales=args.scales)["val"]
    model = (common.build_teacher(data.num_classes, pretrained=True) if weights is None
             else common.load_model(weights).model)
    loader = engine.make_loader(dataset, args.batch_size, data.workers)
    t0 = time.perf_counter()
    metrics = engine.compute_metrics(model.to(device), loader, device, data.num_classes,
                                     precision=engine.resolve_amp(args.amp, device), flip=args.flip)
    return {"scales": list(args.scales), "flip": args.flip, "miou": metrics["miou"],
            "pixel_acc": metrics["pixel_acc"], "seconds": time.perf_counter() - t0}


def multiscale(args):
    return args.scales != (1.0,) or args.flip


def evaluate_run(run, args, device):
    """With --scales/--flip: the run's final weights (last.pth, the last epoch) evaluated so, once (final_eval.json)."""
    if run["status"] != "done" or not multiscale(args):
        return
    path = os.path.join(run["dir"], "final_eval.json")
    key = {"scales": list(args.scales), "flip": args.flip, "epochs": len(run["history"])}
    if os.path.isfile(path):
        saved = fileio.read_json(path)
        if {k: saved.get(k) for k in key} == key:
            run["final_eval"] = saved
            return
    try:
        result = dict(final_evaluation(args, os.path.join(run["dir"], "last.pth"), run["ns"], device), **key)
    except errors.UserError as e:
        fail(run, f"final evaluation: {e}")
        return
    fileio.write_json(path, result)
    run["final_eval"] = result
    print(f"final evaluation of {run['label']} seed {run['seed']} at scales {','.join(f'{s:g}' for s in args.scales)}"
          f"{' + flip' if args.flip else ''}: mIoU {result['miou']:.2f} ({result['seconds']:.1f} s)", flush=True)


def mean_std(values):
    """Mean and sample std; one value has no spread to report (std None, shown as the mean alone)."""
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise_row(row, runs, base_runs):
    """The table's figures for one row from its runs' histories (the final epoch, the best epoch, epoch times) and
    the paired difference with the baseline run of the same seed."""
    ok = [r for r in runs if r["status"] == "done"]
    final = {r["seed"]: r["history"][-1]["val_miou"] for r in ok}
    best = {r["seed"]: max(h["val_miou"] for h in r["history"]) for r in ok}
    base = {r["seed"]: r["history"][-1]["val_miou"] for r in base_runs or () if r["status"] == "done"}
    diffs = [final[s] - base[s] for s in final if s in base] if base_runs is not None else []
    times = [h["epoch_s"] for r in ok for h in r["history"]]
    ms = [r["final_eval"]["miou"] for r in ok if "final_eval" in r]
    out = {"model": row.label, "strategy": row.strategy, "overrides": dict(row.overrides), "seeds": len(ok),
           "seeds_failed": [r["seed"] for r in runs if r["status"] != "done"],
           "miou_runs": list(final.values()), "miou_by_seed": final,
           "best_epoch_miou_runs": list(best.values()),
           "pixel_acc": statistics.mean(r["history"][-1]["val_pixel_acc"] for r in ok) if ok else None,
           "epochs": len(ok[0]["history"]) if ok else 0, "epoch_s": statistics.median(times) if times else None,
           "histories": {r["seed"]: r["history"] for r in ok},
           "one_class_seeds": [r["seed"] for r in ok if r["history"][-1].get("val_classes_predicted") == 1]}
    out["miou"], out["miou_std"] = mean_std(out["miou_runs"])
    out["best_epoch_miou"], out["best_epoch_miou_std"] = mean_std(out["best_epoch_miou_runs"])
    out["ms_miou"], out["ms_miou_std"] = mean_std(ms)
    out["diff"], out["diff_std"] = mean_std(diffs)
    out["diff_positive"], out["diff_pairs"] = sum(d > 0 for d in diffs), len(diffs)
    return out


def fmt(mean, std, digits=2, signed=False):
    if mean is None:
        return "-"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if std is None else f"{text} +- {std:.{digits}f}"


COLUMNS_EXPLAINED = """\
- final val mIoU: the val mIoU (%) after the last epoch, mean +- sample std over the seeds (one seed: its value
  alone, no spread); per seed in seed order.
- best epoch: the highest val mIoU of any epoch, mean over seeds. The epoch is chosen on val itself, so this figure
  is optimistic; compare strategies on the final one.
- paired diff: final val mIoU minus the baseline's of the same seed (same data order and initialisation draw),
  mean +- std over seeds; "> 0" counts the seeds where the strategy beat its baseline.
- {ms}
- epoch time: median seconds per epoch (training + validation) over every epoch of every seed, and its ratio to the
  baseline's; both from this machine, in this comparison.
"""


def finished_in_table(out_dir):
    """How many runs the comparison's current results.json counts as finished (0 if there is none or it is unreadable:
    then anything may replace it)."""
    try:
        return sum(int(r["seeds"]) for r in fileio.read_json(os.path.join(out_dir, "results.json"))["rows"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def write_results(args, rows, teacher, runs, device_name):
    """results.md, results.json, summary.png, miou_all.png; a table with fewer finished runs than the one already
    there (a teacher replaced, a damaged run) goes beside it as results.incomplete.md/.json instead, and says so.
    Returns the table's path."""
    finished, before = sum(r["seeds"] for r in rows), finished_in_table(args.out_dir)
    name = "results" if finished >= before else "results.incomplete"
    have_base = any(r["model"] == BASELINE for r in rows)
    base = next((r for r in rows if r["model"] == BASELINE), None)
    ms_label = (f"MS{'+flip' if args.flip else ''} mIoU" if multiscale(args) else None)
    header = ["model", "params (M)", "seeds", "final val mIoU (mean +- std)", "per seed",
              "best epoch (chosen on val)", "paired diff vs baseline", "> 0"] + ([ms_label] if ms_label else []) + \
             ["pixel acc", "epochs", "median epoch (s)", "epoch time vs baseline"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if teacher is not None:
        t = teacher
        lines.append("| " + " | ".join(
            ["teacher", f"{t['params_m']:.2f}", "1" if t.get("miou") is not None else "0",
             "-" if t.get("miou") is None else f"{t['miou']:.2f}", t["source"], "-", "-", "-"]
            + ([f"{t['ms_miou']:.2f}" if t.get("ms_miou") is not None else "-"] if ms_label else [])
            + [f"{t['pixel_acc']:.2f}" if t.get("pixel_acc") is not None else "-", str(t.get("epochs") or "-"),
               f"{t['epoch_s']:.1f}" if t.get("epoch_s") else "-", "-"]) + " |")
    for r in rows:
        ratio = (f"{r['epoch_s'] / base['epoch_s']:.2f}x" if base and base["epoch_s"] and r["epoch_s"] else "-")
        per_seed = ", ".join(f"{v:.2f}" for v in r["miou_runs"]) or "-"
        if r["seeds_failed"]:
            per_seed += f" (failed: seed {', '.join(map(str, r['seeds_failed']))})"
        cells = [r["model"], f"{r['params_m']:.2f}", str(r["seeds"]), fmt(r["miou"], r["miou_std"]), per_seed,
                 fmt(r["best_epoch_miou"], r["best_epoch_miou_std"]),
                 "-" if r["model"] == BASELINE or not have_base else fmt(r["diff"], r["diff_std"], signed=True),
                 "-" if r["model"] == BASELINE or not r["diff_pairs"] else f"{r['diff_positive']}/{r['diff_pairs']}"]
        cells += [fmt(r["ms_miou"], r["ms_miou_std"])] if ms_label else []
        cells += ["-" if r["pixel_acc"] is None else f"{r['pixel_acc']:.2f}", str(r["epochs"]),
                  "-" if r["epoch_s"] is None else f"{r['epoch_s']:.1f}", ratio]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in runs if r["status"] == "failed"]
    scales = ",".join(f"{s:g}" for s in args.scales) + (" and mirrored" if args.flip else "")
    notes = COLUMNS_EXPLAINED.format(ms=f"{ms_label}: the final model evaluated at scales {scales} (probabilities "
                                        f"averaged), mean +- std over seeds." if ms_label else
                                        "multi-scale: not asked for (--scales/--flip).")
    if not have_base:
        notes += "- no paired difference: --strategies has no plain baseline row.\n"
    one_class = [f"{r['model']} (seed {', '.join(map(str, r['one_class_seeds']))})" for r in rows
                 if r["one_class_seeds"]]
    one_class_note = (f"NOTE: these models predict one class everywhere on val after their last epoch, so their "
                      f"figures say nothing about the strategy: {'; '.join(one_class)}. The recipe has not learnt: "
                      f"raise --lr (2e-3 on the toy set from random weights) or --epochs.\n" if one_class else "")
    notes += f"\n{one_class_note}"
    text = "\n".join(lines) + "\n\n" + (
        f"{len(args.seeds)} seeds ({','.join(map(str, args.seeds))}), {args.epochs} epochs each, on {device_name}.\n\n"
        + notes + "".join(f"\nFAILED: {r['label']} seed {r['seed']}: {r['error']}" for r in failed))
    fileio.atomic_write(os.path.join(args.out_dir, f"{name}.md"), lambda tmp: open(tmp, "w").write(text + "\n"))
    settings = {k: v for k, v in vars(args).items() if k in engine.recipe_dests() | {
        "strategies", "seeds", "teacher_epochs", "teacher_weights", "grid", "scales", "flip"}}
    fileio.write_json(os.path.join(args.out_dir, f"{name}.json"), {
        "settings": dict(settings, scales=list(args.scales)), "device": device_name,
        "teacher": None if teacher is None else {k: v for k, v in teacher.items() if k != "history"},
        "rows": [{k: v for k, v in r.items() if k != "histories"} for r in rows],
        "failed": [{"model": r["label"], "seed": r["seed"], "error": r["error"]} for r in failed]})
    print("\n" + "\n".join(lines) + (f"\n{one_class_note.rstrip()}" if one_class else ""))
    if name != "results":
        print(f"kept {args.out_dir}/results.md ({before} finished runs); this attempt finished {finished}: its table "
              f"is {args.out_dir}/{name}.md", flush=True)
        return os.path.join(args.out_dir, f"{name}.md")
    histories = {f"{r['model']} seed {s}": h for r in rows for s, h in r["histories"].items()}
    groups = {f"{r['model']} seed {s}": r["model"] for r in rows for s in r["histories"]}
    if teacher is not None and teacher.get("history"):
        histories = {"teacher": teacher["history"], **histories}
    if not finished:  # no student to plot: no empty chart
        print(f"table: {args.out_dir}/results.md (+ results.json); no plots: no run finished", flush=True)
        return os.path.join(args.out_dir, "results.md")
    plots.plot_runs_miou(histories, os.path.join(args.out_dir, "miou_all.png"), groups)
    plots.plot_comparison([r for r in rows if r["seeds"]], None if teacher is None else teacher.get("miou"),
                          os.path.join(args.out_dir, "summary.png"))
    print(f"table: {args.out_dir}/results.md (+ results.json), plots: {args.out_dir}/summary.png and miou_all.png")
    return os.path.join(args.out_dir, "results.md")


def check_teacher_flags(args):
    if args.teacher_weights and args.teacher_epochs:
        raise errors.UserError("--teacher-weights and --teacher-epochs both given: distil from the given teacher "
                               "(drop --teacher-epochs) or fine-tune one here (drop --teacher-weights)")
    if args.teacher_weights and not os.path.isfile(args.teacher_weights):
        raise errors.UserError(f"--teacher-weights {args.teacher_weights}: no such file")


def check_weights_before_training(args, distils):
    """The pretrained weights the runs would each load (the backbone unless --no-pretrained; torchvision's teacher for
    distilled rows given no teacher, or one fine-tuned here from it): loaded once now, so a missing file stops the
    comparison before its first run, not in every run after hours of training."""
    if not args.no_pretrained:
        common.build_student(args.num_classes, pretrained=True)
    if distils and not args.teacher_weights and not (args.teacher_epochs and args.no_pretrained):
        try:
            common.build_teacher(args.num_classes, pretrained=True)
        except errors.UserError as e:
            raise errors.UserError(str(e).replace(", or run with --no-pretrained", "") + ", or give the distilled rows "
                                   "a teacher: --teacher-weights PATH, or --teacher-epochs N (fine-tuned here; "
                                   "with --no-pretrained from random weights)") from None


def prepare_teacher(args, seeds):
    """(teacher weights for the KD runs, the teacher's run record or None)."""
    if not args.teacher_epochs:
        return args.teacher_weights, None
    out = os.path.join(args.out_dir, "teacher")
    baseline = methods.registry()[BASELINE]
    ns = run_args(args, baseline, (("model", "teacher"), ("epochs", args.teacher_epochs)), out, seeds[0], None)
    return os.path.join(out, "best.pth"), {"label": "teacher", "strategy": "teacher", "method": baseline,
                                           "seed": seeds[0], "dir": out, "ns": ns, "epochs": args.teacher_epochs,
                                           "status": "todo"}


def describe_teacher(args, weights, teacher_run, device, num_classes):
    """The teacher row: its final val mIoU (its run's last epoch, or an evaluation of the given/pretrained teacher)."""
    params = common.count_params(common.build_teacher(num_classes, pretrained=False)) / 1e6
    if teacher_run is not None:
        if teacher_run["status"] != "done":
            return {"source": "fine-tuned here: FAILED", "params_m": params, "error": teacher_run.get("error")}
        history = teacher_run["history"]
        out = {"source": f"fine-tuned here ({teacher_run['dir']})", "params_m": params,
               "miou": history[-1]["val_miou"], "pixel_acc": history[-1]["val_pixel_acc"], "epochs": len(history),
               "epoch_s": statistics.median(h["epoch_s"] for h in history), "history": history}
        evaluate_run(teacher_run, args, device)
        if "final_eval" in teacher_run:
            out["ms_miou"] = teacher_run["final_eval"]["miou"]
        return out
    ns = run_args(args, methods.registry()[BASELINE], (("model", "teacher"),), args.out_dir, 0, None)
    source = weights or "torchvision's pretrained FCN-ResNet50"
    path = os.path.join(args.out_dir, "teacher_eval.json")  # evaluated once per teacher file, scales and flip
    key = {"weights": weights, "scales": list(args.scales), "flip": args.flip,
           "file": None if weights is None else fileio.file_record(weights)}
    saved = fileio.read_json(path) if os.path.isfile(path) else {}
    if {k: saved.get(k) for k in key} == key:
        return saved
    try:
        single = final_evaluation(argparse.Namespace(**dict(vars(args), scales=(1.0,), flip=False)), weights, ns,
                                  device)
        out = dict(key, source=source, params_m=params, miou=single["miou"])
        if multiscale(args):
            out["ms_miou"] = final_evaluation(args, weights, ns, device)["miou"]
    except errors.UserError as e:
        print(f"teacher evaluation FAILED: {e}", flush=True)
        return {"source": f"{source}: FAILED", "params_m": params, "error": str(e)}
    fileio.write_json(path, out)
    return out


def main(args):
    if "RANK" in os.environ:
        raise errors.UserError("compare.py trains its runs one after another in one process and does not run under "
                               "torchrun; run it as `python compare.py ...` (each run uses the one --device)")
    rows = plan_rows(args)
    check_teacher_flags(args)
    common.check_scales(args.scales, args.image_size or flags.default_image_size(args.image_size_rule, args.toy))
    fileio.check_output_dir(args.out_dir, "--out-dir")
    check_weights_before_training(args, any(r.strategy != BASELINE for r in rows))  # the flags first: they are cheap
    os.makedirs(args.out_dir, exist_ok=True)
    with engine.run_lock(args.out_dir):  # a second comparison on this folder is refused, naming this one's pid
        return run_comparison(args, rows, distributed.init_distributed(args.device))


AGAIN = "every finished run and evaluation is kept; run the same compare.py command again to finish the table"


def run_comparison(args, rows, device):
    """Train what is not finished, evaluate, write the results; the table's rows."""
    distils = any(r.strategy != BASELINE for r in rows)
    teacher_weights, teacher_run = prepare_teacher(args, args.seeds) if distils else (None, None)
    runs = [] if teacher_run is None else [teacher_run]
    for row in rows:
        method, fixed = STRATEGIES[row.strategy]
        for seed in args.seeds:
            out = run_dir(args, row.label, seed)
            ns = run_args(args, method, tuple(fixed.items()) + row.overrides, out, seed,
                          None if row.strategy == BASELINE else teacher_weights)
            runs.append({"label": row.label, "strategy": row.strategy, "row": row, "method": method, "seed": seed,
                         "dir": out, "ns": ns, "epochs": ns.epochs, "status": "todo"})
    for run in runs:  # what is already finished is kept (and checked to be the same experiment)
        try:
            run["history"] = finished_history(run["ns"])
        except errors.UserError as e:
            fail(run, str(e))
            continue
        if run["history"] is not None:
            run["status"] = "done"
    todo = [r for r in runs if r["status"] == "todo"]
    print(f"compare: {len(rows)} rows x {len(args.seeds)} seeds{' + the teacher' if teacher_run else ''}: "
          f"{len(runs)} runs, {len(runs) - len(todo) - sum(r['status'] == 'failed' for r in runs)} already "
          f"finished, {len(todo)} to train -> {args.out_dir}", flush=True)
    with fileio.on_signal_exit("comparing (between runs)", advice=AGAIN):
        for i, run in enumerate(todo, 1):
            if run["strategy"] not in (BASELINE, "teacher") and teacher_run is not None \
                    and teacher_run["status"] == "failed":
                fail(run, f"the teacher's fine-tuning failed ({teacher_run['error']})")
                continue
            if check_teacher(run, teacher_weights):
                train_run(run, runs, args, i, len(todo))
    with fileio.on_signal_exit("evaluating the final models", advice=AGAIN):
        for run in runs:
            if run is not teacher_run and (run["status"] != "done" or check_teacher(run, teacher_weights)):
                evaluate_run(run, args, device)
        num_classes = runs[-1]["ns"].num_classes
        teacher = describe_teacher(args, teacher_weights, teacher_run, device, num_classes) if distils else None
    student_params = common.count_params(common.build_student(num_classes, pretrained=False)) / 1e6
    summaries = []
    for row in rows:
        row_runs = [r for r in runs if r.get("row") == row]
        base_runs = [r for r in runs if r.get("row") == Row(BASELINE, BASELINE)] or None
        summaries.append(dict(summarise_row(row, row_runs, base_runs), params_m=student_params))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table = write_results(args, summaries, teacher, [r for r in runs if r is not teacher_run], device_name)
    failed = [r for r in runs if r["status"] == "failed"]
    if failed:
        raise errors.UserError(f"{len(failed)} of {len(runs)} runs failed (listed under the table in "
                               f"{table}); fix the cause and run the same command again: the "
                               f"finished runs are kept")
    return summaries


if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
