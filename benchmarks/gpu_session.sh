#!/usr/bin/env bash
# One GPU session's checks, in one go (the device tool lends a GPU for minutes): the CUDA-only tests, the callbacks'
# cost alternated inside each run (ResNet-18, host-bound; ResNet-50, device-bound), then separate runs that count
# host-device syncs per step. Results land in $OUT (default ./gpu-out). About 5 minutes on an H100.
# Usage on the GPU machine, from the repository root:  PYTHONPATH=$PWD bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" >> "$OUT/gpu.txt"
timeout 150 python -m pytest -q -s tests/test_gpu.py -p no:cacheprovider > "$OUT/test_gpu.log" 2>&1
echo "test_gpu exit $?" >> "$OUT/test_gpu.log"
tail -3 "$OUT/test_gpu.log"
# The cost figures: plain and the configuration alternate every 20 steps inside each run, each block timed between
# two synchronizes (separate runs of the same plain ResNet-18 spanned 13-15 ms a step on a shared H100).
timeout 160 python benchmarks/overhead.py --device cuda --workloads resnet18-32px-b256 --toggle 20 --steps 400 \
    --repeats ${R18_REPEATS:-3} --configs ${R18_CONFIGS:-all monitor mixup} --out "$OUT/resnet18-toggled" \
    > "$OUT/resnet18-toggled.log" 2>&1
echo "resnet18 toggled exit $?"
timeout 110 python benchmarks/overhead.py --device cuda --workloads resnet50-160px-b128 --toggle 20 --steps 300 \
    --repeats ${R50_REPEATS:-3} --configs all --out "$OUT/resnet50-toggled" > "$OUT/resnet50-toggled.log" 2>&1
echo "resnet50 toggled exit $?"
# Syncs per step (exact), and the throughput of separate runs for comparison with earlier tables.
timeout 100 python benchmarks/overhead.py --device cuda --workloads resnet18-32px-b256 --steps 120 --repeats 2 \
    --configs plain all --out "$OUT/resnet18" > "$OUT/resnet18.log" 2>&1
echo "resnet18 syncs exit $?"
cat "$OUT"/resnet18-toggled/overhead_toggled.md "$OUT"/resnet50-toggled/overhead_toggled.md \
    "$OUT"/resnet18/overhead.md 2>/dev/null
