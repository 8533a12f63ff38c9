"""Inference backends and timing, shared by time_student.py and time_teacher.py: every backend's batch-1 latency
(timed in turns), throughput, output difference to eager and val mIoU; ONNX export; where the time goes (profiles).
"""
import argparse
import copy
import json
import math
import os
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

import common
import engine
import errors
import fileio
import flags
from distributed import init_distributed

TIMING_BACKENDS = ("eager", "channels_last", "bf16", "fp16", "compile", "onnxruntime")


class BackendUnavailable(Exception):
    """This backend cannot run on this machine/device (the reason is reported, not hidden)."""


def backend_list(text):
    names = TIMING_BACKENDS if text == "all" else tuple(text.split(","))
    bad = [n for n in names if n not in TIMING_BACKENDS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown backend {bad[0]!r}; choose from {', '.join(TIMING_BACKENDS)} or all")
    return names


def add_timing_args(parser):
    flags.add_data_args(parser, "deployment", trains=False)
    parser.add_argument("--backend", type=backend_list, default="eager",
                        help=f"how the model runs: {', '.join(TIMING_BACKENDS)}, a comma-separated list of them, or "
                             f"'all' for every backend side by side (default: %(default)s)")
    parser.add_argument("--batch-size", type=flags.positive_int, default=16,
                        help="batch size of the throughput measurement (default: %(default)s)")
    parser.add_argument("--runs", type=flags.positive_int, default=50,
                        help="timed runs at batch 1 per backend, in turns with the other backends "
                             "(default: %(default)s)")
    parser.add_argument("--warmup", type=flags.non_negative_int, default=10,
                        help="untimed warm-up runs (default: %(default)s)")
    parser.add_argument("--threads", type=flags.positive_int, default=None,
                        help="CPU threads for PyTorch and ONNX Runtime (default: PyTorch's default)")
    parser.add_argument("--no-miou", action="store_true", help="skip the val mIoU measurement")
    parser.add_argument("--profile", action="store_true",
                        help="print where the time goes: a torch.profiler table of the eager model, ONNX Runtime's "
                             "kernel time and GFLOP/s per kind of operator (when --backend includes onnxruntime), and "
                             "this machine's fp32 compute floor for the model")
    parser.add_argument("--json", default=None, metavar="PATH", help="write all figures as JSON to PATH")
    parser.add_argument("--plot", default=None, metavar="PATH", help="draw latency distributions (and, with "
                        "--compare, the speed/accuracy point of each model) to PATH")
    parser.add_argument("--compare", nargs="*", default=[], metavar="JSON",
                        help="timing JSON files of other models to draw beside this one in --plot")
    return parser


def export_onnx(model, path, image_size, verify=True):
    """Export to ONNX with a dynamic batch axis; verify ONNX Runtime's output against PyTorch's. Returns max |diff|."""
    model = copy.deepcopy(model).eval().cpu()  # the caller's model stays on its device and in its mode
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer notes about python flags
        torch.onnx.export(model, (x,), path, input_names=["image"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    if not verify:
        return None
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(x3).numpy()
    diff = float(np.abs(session.run(None, {"image": x3.numpy()})[0] - ref).max())
    if not diff < 1e-3:
        raise errors.UserError(f"ONNX export {path} differs from PyTorch by {diff:.2e} (max abs); not usable")
    return diff


def onnx_session(model, image_size, device, threads=None, profile_prefix=None):
    """An ONNX Runtime session (all graph optimisations) of model exported at image_size; BackendUnavailable without
    onnxruntime. profile_prefix: turn on ONNX Runtime's profiler, writing its JSON at that path prefix."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable("onnxruntime is not installed (pip install onnxruntime)")
    import tempfile
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers = ["CUDAExecutionProvider"] if device.type == "cuda" else []
    with tempfile.TemporaryDirectory() as tmp:  # the session keeps the model in memory; the file can go
        path = os.path.join(tmp, "model.onnx")
        export_onnx(model.cpu(), path, image_size, verify=False)
        return ort.InferenceSession(path, options, providers=providers + ["CPUExecutionProvider"])


def prepare_backend(model, backend, device, image_size, threads=None):
    """A function x -> float32 logits running model with the given backend; BackendUnavailable if it can't run here."""
    model = copy.deepcopy(model).eval().to(device)
    if backend == "eager":
        return model
    if backend == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        return lambda x: model(x.contiguous(memory_format=torch.channels_last))
    if backend == "bf16":
        # runs on any CPU: natively with AVX512-BF16/AMX, emulated (same rounding, slower) elsewhere
        return lambda x: _autocast_run(model, x, device.type, torch.bfloat16)
    if backend == "fp16":
        if device.type != "cuda":
            raise BackendUnavailable("fp16 inference is a CUDA backend; on CPU use bf16")
        model = model.half()
        return lambda x: model(x.half()).float()
    if backend == "compile":
        compiled = torch.compile(model)
        return compiled
    if backend == "onnxruntime":
        session = onnx_session(model, image_size, device, threads)
        return lambda x: torch.from_numpy(session.run(None, {"image": x.cpu().numpy()})[0]).to(x.device)
    raise ValueError(backend)


def _autocast_run(model, x, device_type, dtype):
    with torch.autocast(device_type, dtype=dtype):
        return model(x).float()


def measure_latency(fns, x, warmup, runs, device, rounds=10):
    """Seconds per call of each fn(x) in fns (name -> fn; runs: name -> timed calls), each call timed alone after
    warm-up (CUDA synchronised). The functions take turns over `rounds` rounds, so a busy spell of a shared machine
    slows all of them alike and the ratios between them stay fair; each turn starts with one untimed call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    times = {name: [] for name in fns}
    rounds = max(1, min(rounds, max(runs.values())))  # a round in which nothing is timed would only cost time
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn(x)
        sync()
        for r in range(rounds):
            for name, fn in fns.items():
                time.sleep(0.05)  # lets the previous runtime's spinning worker threads go to sleep
                fn(x)  # untimed: the first call of a turn pays for the caches the other functions evicted
                for _ in range(runs[name] * (r + 1) // rounds - runs[name] * r // rounds):  # runs spread evenly
                    t0 = time.perf_counter()
                    fn(x)
                    sync()
                    times[name].append(time.perf_counter() - t0)
    return times


def latency_stats(seconds):
    median = float(np.median(seconds))
    return {"latency_ms_median": 1000 * median, "latency_ms_p90": 1000 * float(np.percentile(seconds, 90)),
            "fps": 1.0 / median, "latencies_ms": [1000 * t for t in seconds]}


def prepare_backends(model, backends, device, x, threads):
    """name -> (fn, max |fn(x) - eager(x)|) for each backend that runs here; name -> reason for the others."""
    with torch.inference_mode():
        reference = model(x).float()
    ready, unavailable = {}, {}
    for backend in backends:
        print(f"preparing {backend} ...", flush=True)
        try:
            fn = prepare_backend(model, backend, device, x.shape[-1], threads)
            with torch.inference_mode():
                ready[backend] = fn, float((fn(x).float() - reference).abs().max())
        except BackendUnavailable as e:
            unavailable[backend] = str(e)
    return ready, unavailable


class _Callable(nn.Module):
    """Lets engine.compute_metrics() run any backend function."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def run(args, model, name, teacher=None, teacher_runs=None):
    """What both timing scripts do once their model is built: time it as the flags say, print the table, and write
    the profile, --json and --plot."""
    if args.threads:
        torch.set_num_threads(args.threads)
    for flag in ("json", "plot"):
        if getattr(args, flag):
            fileio.check_output_file(getattr(args, flag), f"--{flag}")
    device = init_distributed(args.device)
    data = common.data_config(args)
    val_loader = None
    if not args.no_miou:
        val_set = common.build_datasets(data, splits=("val",))["val"]
        val_loader = engine.make_loader(val_set, 8, data.workers)
    result = time_model(model, name, args.backend, device, data.image_size, args.batch_size, args.runs, args.warmup,
                        args.threads, val_loader, teacher, teacher_runs)
    if teacher is not None:
        result["vs_teacher"]["weights"] = args.teacher_weights
    print_timing_table(result)
    if args.profile:
        x1 = torch.randn(1, 3, data.image_size, data.image_size, generator=torch.Generator().manual_seed(0)).to(device)
        profile_model(model, x1)
        result["gemm_gflops_per_s"] = gemm_gflops_per_s(device)
        if "latency_ms_median" in result["backends"].get("onnxruntime", {}):
            result["onnxruntime_profile"] = [{"kind": k, "ms": ms, "gflop": g}
                                             for k, ms, g in profile_onnxruntime(model, x1, args.threads)]
        print_profile(result)
    if args.json:
        fileio.write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.plot:
        others = []
        for path in args.compare:
            with open(path) as f:
                others.append(json.load(f))
        plot_timing([result] + others, args.plot)
        print(f"wrote {args.plot}")
    return result


def inputs(image_size, batch_size, device):
    """The fixed random batch-1 and batch-N inputs every backend is timed on."""
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, 3, image_size, image_size, generator=gen).to(device),
            torch.randn(batch_size, 3, image_size, image_size, generator=gen).to(device))


def time_model(model, name, backends, device, image_size, batch_size, runs, warmup, threads, val_loader=None,
               teacher=None, teacher_runs=10):
    """Every backend's latency (batch 1, median/p90, in turns), throughput at batch_size, output difference to eager
    and (with a val_loader) val mIoU; backends that cannot run here are reported with the reason. With a teacher, its
    batch-1 latency on the same backends joins the same turns, and the teacher/student ratio is reported."""
    x1, xb = inputs(image_size, batch_size, device)
    model = model.eval().to(device)
    result = {"model": name, "params": common.count_params(model), "image_size": image_size, "device": str(device),
              "size_mb": sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2 ** 20,
              "threads": torch.get_num_threads(), "batch_size": batch_size, "miou": None,
              "gflops": model_gflops(model, x1), "backends": {}}
    ready, unavailable = prepare_backends(model, backends, device, x1, threads)
    for backend, reason in unavailable.items():
        print(f"{backend:>14s}: unavailable ({reason})")
    if not ready:
        raise errors.UserError(f"--backend {','.join(backends)}: none of them can run here (see above); "
                               f"eager and onnxruntime run everywhere")
    fns, counts = {b: fn for b, (fn, _) in ready.items()}, dict.fromkeys(ready, runs)
    teacher_ready = {}
    if teacher is not None:
        teacher_ready, _ = prepare_backends(teacher.eval().to(device), list(ready), device, x1, threads)
        fns.update({f"teacher {b}": fn for b, (fn, _) in teacher_ready.items()})
        counts.update({f"teacher {b}": teacher_runs for b in teacher_ready})
    print(f"timing {', '.join(fns)} in turns at batch 1, then batch {batch_size} ...", flush=True)
    latencies = measure_latency(fns, x1, warmup, counts, device)
    batched = measure_latency({b: fn for b, (fn, _) in ready.items()}, xb, min(warmup, 2),
                              dict.fromkeys(ready, max(3, runs // 10)), device)
    for backend in backends:
        if backend in unavailable:
            result["backends"][backend] = {"unavailable": unavailable[backend]}
            continue
        rec = latency_stats(latencies[backend])
        rec.update(throughput_img_s=batch_size / float(np.median(batched[backend])), max_abs_diff=ready[backend][1])
        if val_loader is not None:
            backend_fn = _Callable(ready[backend][0])
            rec["miou"] = engine.compute_metrics(backend_fn, val_loader, device, model.num_classes)["miou"]
            if backend == "eager" or result["miou"] is None:
                result["miou"] = rec["miou"]
        result["backends"][backend] = rec
        print(f"{backend:>14s}: {rec['latency_ms_median']:8.2f} ms median, {rec['latency_ms_p90']:8.2f} ms p90 at "
              f"batch 1 | {rec['throughput_img_s']:7.1f} img/s at batch {batch_size} | max |diff| "
              f"{rec['max_abs_diff']:.1e}" + (f" | mIoU {rec['miou']:.2f}" if "miou" in rec else ""), flush=True)
    if teacher is not None:
        result["vs_teacher"] = {"params": common.count_params(teacher), "backends": {}}
        for backend, (_, diff) in teacher_ready.items():
            rec = latency_stats(latencies[f"teacher {backend}"])
            student_ms = result["backends"][backend]["latency_ms_median"]
            rec.update(max_abs_diff=diff, ratio=rec["latency_ms_median"] / student_ms)
            result["vs_teacher"]["backends"][backend] = rec
    return result


def print_timing_table(result):
    ok = {k: v for k, v in result["backends"].items() if "latency_ms_median" in v}
    eager = ok.get("eager", {}).get("latency_ms_median")
    teacher = result.get("vs_teacher", {}).get("backends", {})
    miou = f", val mIoU {result['miou']:.2f}" if result["miou"] is not None else ""
    print(f"\n{result['model']}: {result['params']:,} parameters, {result['size_mb']:.1f} MB, "
          f"{result['image_size']}px, {result['device']}, {result['threads']} threads{miou}")
    print(f"| backend | median ms (batch 1) | p90 ms | FPS | img/s (batch {result['batch_size']}) | "
          f"speed-up vs eager | max abs diff |"
          + (" teacher ms (batch 1) | teacher / student |" if teacher else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|" if teacher else ""))
    for name, r in ok.items():
        speedup = f"{eager / r['latency_ms_median']:.2f}x" if eager else "-"
        t = teacher.get(name)
        print(f"| {name} | {r['latency_ms_median']:.2f} | {r['latency_ms_p90']:.2f} | {r['fps']:.1f} | "
              f"{r['throughput_img_s']:.1f} | {speedup} | {r['max_abs_diff']:.1e} |"
              + (f" {t['latency_ms_median']:.1f} | {t['ratio']:.1f}x |" if t else " - | - |" if teacher else ""))


def profile_model(model, x, rows=15):
    """Where the eager model's time goes: torch.profiler operator table, sorted by self CPU time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.device.type == "cuda" else [])
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        with profile(activities=activities) as prof:
            for _ in range(10):
                model(x)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def model_gflops(model, x):
    """Floating-point operations of model(x) (convolutions and matrix products; 1 multiply-add = 2), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() / 1e9


def gemm_gflops_per_s(device, n=2048, runs=10):
    """This machine's fp32 matrix-multiply rate right now (median of torch.mm of two n x n matrices): the practical
    compute roofline that no fp32 backend beats on convolutions."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    times = measure_latency({"mm": lambda x: torch.mm(a, x)}, b, 2, {"mm": runs}, device, rounds=1)["mm"]
    return 2 * n ** 3 / float(np.median(times)) / 1e9


def onnx_kernel_kind(args):
    """(kind, FLOP) of one ONNX Runtime kernel from the shapes in its profiler record."""
    shapes = [list(d.values())[0] for d in args.get("input_type_shape", [])]
    out = list(args["output_type_shape"][0].values())[0] if args.get("output_type_shape") else []
    op = args["op_name"]
    if op == "Conv":
        w = shapes[1]  # (out channels, in channels / groups, kh, kw)
        flops = 2 * math.prod(out) * math.prod(w[1:])
        if out[2:] == [1, 1]:
            return "conv on 1x1 maps (squeeze-excitation)", flops
        if w[2:] == [1, 1]:
            return "conv 1x1", flops
        return (f"conv depthwise {w[2]}x{w[3]}" if w[1] == 1 else f"conv {w[2]}x{w[3]}"), flops
    if op in ("MatMul", "FusedMatMul"):
        return "matmul (final upsampling)", 2 * math.prod(out) * shapes[0][-1]
    if op in ("ReorderInput", "ReorderOutput"):
        return "layout reorder NCHW <-> NCHWc", 0
    return op, 0


def profile_onnxruntime(model, x, threads=None, runs=20, warmup=3):
    """Where ONNX Runtime's time goes: its session profiler over `runs` runs after `warmup`, kernel time and GFLOP per
    run for each kind of operator (convolutions split by shape). Returns [(kind, ms, GFLOP)], slowest first."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        session = onnx_session(model, x.shape[-1], x.device, threads, profile_prefix=os.path.join(tmp, "ort"))
        feed = {"image": x.cpu().numpy()}
        for _ in range(warmup + runs):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    start = sorted(e["ts"] for e in events if e.get("name") == "model_run")[warmup]
    kinds = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            kind, flops = onnx_kernel_kind(e["args"])
            ms, gflop = kinds.get(kind, (0.0, 0.0))
            kinds[kind] = ms + e["dur"] / 1000 / runs, gflop + flops / 1e9 / runs
    return sorted(((k, ms, gflop) for k, (ms, gflop) in kinds.items()), key=lambda r: -r[1])


def print_profile(result):
    """The ONNX Runtime kernel table (if profiled) and the model's distance from the fp32 compute floor."""
    rows = result.get("onnxruntime_profile", [])
    if rows:
        total = sum(r["ms"] for r in rows)
        print(f"\nONNX Runtime kernels of the {result['model']} (session profiler, batch 1): {total:.2f} ms per run")
        print("| operator | ms per run | share | GFLOP | GFLOP/s |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['kind']} | {r['ms']:.2f} | {100 * r['ms'] / total:.1f}% | {r['gflop']:.3f} | "
                  + (f"{r['gflop'] / r['ms'] * 1000:.0f} |" if r["gflop"] else "- |"))
    timed = [b["latency_ms_median"] for b in result["backends"].values() if "latency_ms_median" in b]
    floor = result["gflops"] / result["gemm_gflops_per_s"] * 1000
    print(f"{result['gflops']:.2f} GFLOP per image; fp32 matrix multiply runs at {result['gemm_gflops_per_s']:.0f} "
          f"GFLOP/s "
          f"here now (torch.mm 2048x2048, {result['threads']} threads), so {floor:.1f} ms is the fp32 compute floor at "
          f"batch 1" + (f"; the fastest backend's {min(timed):.1f} ms is {min(timed) / floor:.2f}x that floor"
                        if timed else ""))


def plot_timing(results, path):
    """Latency distribution per backend (per model) and, for several models, latency vs val mIoU."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels, data = [], []
    for r in results:
        for backend, b in r["backends"].items():
            if "latencies_ms" in b:
                labels.append(f"{r['model']}\n{backend}")
                data.append(b["latencies_ms"])
        for backend, b in r.get("vs_teacher", {}).get("backends", {}).items():
            labels.append(f"teacher (in turns with the {r['model']})\n{backend}")
            data.append(b["latencies_ms"])
    axes[0].boxplot(data, orientation="horizontal")
    axes[0].set_yticks(range(1, len(labels) + 1), labels, fontsize=7)
    axes[0].set_xscale("log")
    axes[0].set(xlabel="latency per image at batch 1 (ms, log)", title="Timing statistics")
    axes[0].grid(alpha=0.3)
    axes[0].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    points = [(f"{r['model']} {backend}", b["latency_ms_median"], b["miou"]) for r in results
              for backend, b in r["backends"].items() if "latency_ms_median" in b and b.get("miou") is not None]
    for label, latency, miou in points:
        axes[1].scatter(latency, miou)
        axes[1].annotate(label, (latency, miou), fontsize=7)
    if not points:
        axes[1].text(0.5, 0.5, "no val mIoU measured (--no-miou)", ha="center", transform=axes[1].transAxes)
    axes[1].set_xscale("log")
    axes[1].set(xlabel="median latency (ms, log)", ylabel="val mIoU (%)", title="Speed vs accuracy")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # (checked writable at the start)
    fig.savefig(path, dpi=100)
    plt.close(fig)
