"""Time the FCN-ResNet50 teacher: latency (median, p90 at batch 1), throughput, FPS, size and val mIoU, per backend.

    python time_teacher.py --no-pretrained --backend all --no-miou --json teacher_timing.json   # offline
    python time_teacher.py --weights checkpoints/demo/teacher/best.pth --toy
    python time_teacher.py --data-dir ./data                          # torchvision's pretrained teacher on VOC val
"""
import argparse

import common
import errors
import timing


def get_args_parser():
    parser = argparse.ArgumentParser(description="Time the FCN-ResNet50 teacher.")
    parser.add_argument("--weights", default=None,
                        help="teacher checkpoint (default: torchvision's pretrained weights)")
    parser.add_argument("--no-pretrained", action="store_true", help="random weights (times the same, works offline)")
    timing.add_timing_args(parser)
    return parser


def main(args):
    if args.weights:
        model = common.load_model(args.weights, expect_arch="teacher").model
    else:
        model = common.build_teacher(args.num_classes, pretrained=not args.no_pretrained)
    return timing.run(args, model, "teacher")


if __name__ == "__main__":
    errors.main_entry(main, get_args_parser)
