#!/usr/bin/env bash
# Device checks for a lent GPU (run from the repository root): the fused projector kernels'
# GPU tests, projector throughput (XLA vs Pallas, tile sweep), and training step time and
# peak memory per resolution strategy. Each step has its own time limit and the whole run
# stops starting new steps after $BUDGET_S seconds; logs and JSON go to $OUT.
#
#   OUT=gpu_out BUDGET_S=300 STEPS="tests proj256 proj128 train128" bash scripts/gpu_checks.sh
#
# The GPU image lacks ml-collections: carry its wheel in .whl/ (see docs/scaling.md).
set -u
OUT=${OUT:-gpu_out}
BUDGET_S=${BUDGET_S:-480}
STEPS=${STEPS:-"tests proj256 proj128 train128 train256 patch256 patch512"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
start=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - start))); }
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  if [ "$(left)" -lt 20 ]; then echo "== $name: skipped (budget)"; return; fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  echo "== $name (limit ${limit}s, t=$(($(date +%s) - start))s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 16
  echo "== $name: rc=${PIPESTATUS[0]}"
}
nvidia-smi -L
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
train() {  # train NAME CONFIG ARGS...
  local name=$1 cfg=$2
  shift 2
  step "$name" 150 python3 -m scripts.bench_train --config="$cfg" --peer= --steps=2 "$@"
}
for s in $STEPS; do
  case $s in
    tests) JAX_PLATFORMS=cuda step tests 150 python3 -m pytest -p no:cacheprovider -q -x \
      -m "gpu or not slow" tests/test_projector_kernel.py tests/test_projector.py \
      tests/test_geometry.py ;;
    gputests) JAX_PLATFORMS=cuda step gputests 90 python3 -m pytest -p no:cacheprovider -q \
      -m "gpu or not slow" tests/test_projector_kernel.py tests/test_projector.py \
      -k "gpu or (joseph and (adjoint or smooth or point or missing))" ;;
    proj256) step proj256 200 python3 -m scripts.bench_projector --out "$OUT/p256" --sizes 256 \
      --views 64 --dets 256 --kernels xla pallas --tiles 8x16 16x16 8x32 --warps 4 8 ;;
    proj256d) step proj256d 60 python3 -m scripts.bench_projector --out "$OUT/p256d" \
      --sizes 256 --views 64 --dets 256 --kernels xla pallas ;;
    proj128) step proj128 60 python3 -m scripts.bench_projector --out "$OUT/p128" --sizes 128 \
      --views 2 8 --dets 128 --kernels xla pallas ;;
    train128) train train128 unet128 --batch=1 ;;
    train256) train train256 unet256 --batch=1 ;;
    patch256) train patch256 unet256_patch --batch=1 ;;
    patch256b2) train patch256b2 unet256_patch ;;
    patch512) train patch512 unet256_patch --batch=1 --resolution=512 ;;
    *) echo "unknown step $s" ;;
  esac
done
echo "== done in $(($(date +%s) - start))s"
