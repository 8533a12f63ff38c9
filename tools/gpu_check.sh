#!/usr/bin/env bash
# The GPU check in one command: the `cuda` tests, the training-throughput benchmark (bench_throughput.py: real-size
# epochs of 1,464 images, both data paths --data-on-device on/off, batch 16 and 64, eager and compiled) on the toy set
# and on a real-VOC subset, then a small comparison on that subset (compare.py: every strategy x 2 seeds, the
# teacher fine-tuned first, final evaluation at 6 scales + flip) and one of its models evaluated single-scale and
# multi-scale + flip (evaluate.py, the time of each). Writes OUT/log.txt, OUT/cuda_tests.xml, OUT/figures.json and
# OUT/compare/results.md (default OUT: gpu_check/).
#
#   bash tools/gpu_check.sh [OUT]
#
# Needs python3 with torch, torchvision, numpy, tqdm, matplotlib, onnx, onnxruntime, scipy, pillow, pytest; no network.
# The VOC subset: voc_subset/ (python tools/voc_subset.py ../shared/voc_sample voc_subset --max-mb 20 makes it, and
# this script does when ../shared/voc_sample is beside the repo). On a machine without CUDA the CUDA part is skipped
# (one line says so) and the benchmark runs a small CPU setting, so every figure is still there.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"   # OUT relative to the repo, or absolute
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python
exec > >(tee "$out/log.txt") 2>&1
export XDG_CACHE_HOME="$out/cache" MPLCONFIGDIR="$out/mpl"
echo "gpu_check $(date -u +%FT%TZ) in $PWD with $($python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')"
if [ ! -d voc_subset ] && [ -d ../shared/voc_sample ]; then
    $python tools/voc_subset.py ../shared/voc_sample voc_subset --max-mb 20
fi
status=0
if $python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    # one process (-o addopts= drops pytest.ini's -n 2: the GPU machine has no pytest-xdist)
    $python -m pytest -q -o addopts= -m cuda tests -p no:cacheprovider -rs --junitxml "$out/cuda_tests.xml" || status=1
    bench=(--amp --workers 8 --image-size 256 --data-on-device both)
    epoch=1464   # VOC train's size; the toy set (300) and the subset (105) are repeated to it
    compare=(--amp --workers 8 --batch-size 16 --image-size 256 --epochs 3 --teacher-epochs 3 --lr 1e-3)
else
    echo "no CUDA device here: the cuda tests are skipped; the benchmark runs a small CPU setting"
    bench=(--workers 2 --image-size 64 --data-on-device both)
    epoch=16
    compare=(--workers 2 --batch-size 4 --image-size 64 --epochs 1 --teacher-epochs 1 --lr 1e-3 --limit-train 8
             --limit-val 4)
fi
$python bench_throughput.py --toy --data-dir "$out/data" "${bench[@]}" --batch-size 16 --epoch-images $epoch \
    --json "$out/bench_toy.json" || status=1
$python bench_throughput.py --toy --data-dir "$out/data" "${bench[@]}" --batch-size 64 --epoch-images $epoch \
    --strategies baseline,response-kd,feature-kd --json "$out/bench_toy_b64.json" || status=1
$python bench_throughput.py --toy --data-dir "$out/data" "${bench[@]}" --batch-size 16 --epoch-images $epoch \
    --strategies baseline,response-kd --compile both --warmup 10 --json "$out/bench_toy_compile.json" || status=1
if [ -d voc_subset ]; then
    $python bench_throughput.py --data-dir voc_subset --no-download "${bench[@]}" --batch-size 16 \
        --epoch-images $epoch --strategies baseline,response-kd,feature-kd --json "$out/bench_voc.json" || status=1
    scales=(--scales 0.5,0.75,1.0,1.25,1.5,1.75 --flip)
    $python compare.py --data-dir voc_subset --no-download --no-pretrained --strategies all \
        --seeds 0,1 "${compare[@]}" "${scales[@]}" --out-dir "$out/compare" || status=1
    model="$out/compare/baseline_seed0/last.pth"
    if [ -f "$model" ]; then
        $python evaluate.py --weights "$model" --data-dir voc_subset --no-download --json "$out/eval_single.json" \
            || status=1
        $python evaluate.py --weights "$model" --data-dir voc_subset --no-download "${scales[@]}" \
            --json "$out/eval_ms_flip.json" || status=1
    fi
else
    echo "no voc_subset/ (and no ../shared/voc_sample to make it from): the real-VOC benchmark is skipped"
fi
$python - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
figures = {name: json.load(open(os.path.join(out, f"bench_{name}.json")))
           for name in ("toy", "toy_b64", "toy_compile", "voc") if os.path.isfile(os.path.join(out, f"bench_{name}.json"))}
evals = {name: json.load(open(os.path.join(out, f"eval_{name}.json")))
         for name in ("single", "ms_flip") if os.path.isfile(os.path.join(out, f"eval_{name}.json"))}
json.dump(dict(figures, evaluation=evals), open(os.path.join(out, "figures.json"), "w"), indent=1)
for name, f in figures.items():
    train = ", ".join(f"{k} {v['img_s']:.0f} img/s (wait {100 * v['data_wait_frac']:.0f}%"
                      + (f", {v['peak_memory_mb']:.0f} MB)" if v['peak_memory_mb'] else ")") for k, v in f["train"].items())
    print(f"{name}: {f['device']}, {f['image_size']}px batch {f['batch_size']} {f['precision']}, epochs of "
          f"{f['epoch_images']} images: {train}; teacher cache build {f['teacher_cache_build_img_s']:.0f} img/s; "
          f"loader {f['loader_img_s']:.0f} img/s")
for name, e in evals.items():
    print(f"evaluate {name}: scales {e['scales']} flip {e['flip']}: mIoU {e['miou']:.2f} in {e['seconds']:.1f} s "
          f"({e['num_images']} images, {e['image_size']} px)")
PY
echo "gpu_check done (status $status): $out/log.txt, $out/figures.json"
exit $status
