"""Time the student: latency (median, p90 at batch 1), throughput, FPS, size and val mIoU, per backend.

    python time_student.py --weights checkpoints/demo/baseline_seed0/best.pth --toy --backend all --json t.json
    python time_student.py --backend all --no-miou                   # random weights: same timing, fully offline
    python time_student.py --backend eager,onnxruntime --no-miou --vs-teacher   # + teacher/student latency ratio
    python time_student.py --weights best.pth --export-onnx student.onnx   # deployable ONNX file (dynamic batch)
"""
import argparse

import common
import errors
import flags
import timing


def get_args_parser():
    parser = argparse.ArgumentParser(description="Time the LightweightDeepLabV3 student.")
    parser.add_argument("--weights", default=None, help="student checkpoint (default: random weights)")
    timing.add_timing_args(parser)
    parser.add_argument("--vs-teacher", action="store_true",
                        help="also time the FCN-ResNet50 teacher at batch 1 on the same backends, in turns with the "
                             "student, and report the teacher/student latency ratio (random teacher weights: the "
                             "timing is the same; or --teacher-weights)")
    parser.add_argument("--teacher-weights", default=None, metavar="PATH",
                        help="teacher checkpoint for --vs-teacher (implies it)")
    parser.add_argument("--teacher-runs", type=flags.positive_int, default=10,
                        help="timed teacher runs per backend with --vs-teacher (default: %(default)s)")
    parser.add_argument("--export-onnx", default=None, metavar="PATH",
                        help="write the student as ONNX (dynamic batch), verified against PyTorch, and exit")
    return parser


def main(args):
    if args.weights:
        model = common.load_model(args.weights, expect_arch="student").model
    else:
        model = common.build_student(args.num_classes, pretrained=False)
    if args.export_onnx:
        diff = timing.export_onnx(model, args.export_onnx, common.data_config(args).image_size)
        print(f"wrote {args.export_onnx} (dynamic batch); ONNX Runtime vs PyTorch max |diff| {diff:.1e}")
        return None
    teacher = None
    if args.vs_teacher or args.teacher_weights:
        teacher = (common.load_model(args.teacher_weights, "--teacher-weights", expect_arch="teacher").model
                   if args.teacher_weights else common.build_teacher(model.num_classes, pretrained=False))
    return timing.run(args, model, "student", teacher, args.teacher_runs)


if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
