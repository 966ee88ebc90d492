#!/usr/bin/env bash
# One GPU session's checks, in one go (the device tool lends a GPU for minutes): the CUDA-only tests, then the
# overhead benchmark's throughput rows on ResNet-18 and ResNet-50. Results land in $OUT (default ./gpu-out).
# Usage on the GPU machine, from the repository root:  PYTHONPATH=$PWD bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" >> "$OUT/gpu.txt"
timeout 150 python -m pytest -q -s tests/test_gpu.py -p no:cacheprovider > "$OUT/test_gpu.log" 2>&1
echo "test_gpu exit $?" >> "$OUT/test_gpu.log"
tail -3 "$OUT/test_gpu.log"
CONFIGS=${CONFIGS:-plain monitor mixup timm_mixup all}
timeout 200 python benchmarks/overhead.py --device cuda --workloads resnet18-32px-b256 --steps 150 --repeats ${R18_REPEATS:-5} \
    --configs $CONFIGS --out "$OUT/resnet18" > "$OUT/resnet18.log" 2>&1
echo "resnet18 exit $?"
timeout 180 python benchmarks/overhead.py --device cuda --workloads resnet50-160px-b128 --steps 100 --repeats ${R50_REPEATS:-4} \
    --configs $CONFIGS --out "$OUT/resnet50" > "$OUT/resnet50.log" 2>&1
echo "resnet50 exit $?"
cat "$OUT"/resnet18/overhead.md "$OUT"/resnet50/overhead.md 2>/dev/null
