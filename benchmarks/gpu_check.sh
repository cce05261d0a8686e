#!/usr/bin/env bash
# The CIFAR-10 speedrun's whole GPU check in one go (benchmarks/CIFAR_SPEED.md says what is still to be measured).
#
#   bash benchmarks/gpu_check.sh [DATA_DIR] [OUT_DIR]
#
# Needs a CUDA GPU that both frameworks see: `pip install -e ".[dev,cuda12]"` and a CUDA build of
# torch==2.13.0. Writes into OUT_DIR (default gpu_check/): nvidia-smi.txt, versions.txt, step/ (the speedrun's
# train step, every GPU variant, interleaved), tta.json (time to 94% for jaxnet and the PyTorch twin, the whole
# recipe once per variant) and tutorial/ (`jaxnet bench --device cuda` for the tutorial models).
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-gpu_check}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt"
python -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/versions.txt"
jaxnet bench --device cuda --model cifar_speed --batch-size 1024 --steps 20 --repeats 5 --out "$OUT/step"
jaxnet bench --device cuda --model cifar_speed --tta --data-dir "$DATA" --json | tail -n 1 > "$OUT/tta.json"
jaxnet bench --device cuda --out "$OUT/tutorial"
echo "wrote $OUT"
