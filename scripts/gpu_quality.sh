#!/bin/bash
# The quality benchmark (benchmarks/quality.py) on one GPU, in one call of a GPU machine.
#
# Prepare here (the GPU machine has no Fashion-MNIST; it needs the test split's classifier
# statistics, which any FID against fashion-mnist-test caches in ~/.cache/epsscale):
#     mkdir -p .gpu_cache && cp ~/.cache/epsscale/fashion-mnist-test-fmnist-*.npz .gpu_cache/
# Run there, from the repository root, with .gpu_cache carried along:
#     BUDGET=420 bash scripts/gpu_quality.sh
# It first runs tests/test_cuda.py and benchmarks/speed.py --device cuda (ES on/off, sampler
# overhead, diffusers' DDIM loop; needs diffusers there, else that step fails alone), then
# quality.py --device cuda for at most BUDGET seconds
# (STEPS, SAMPLERS, BATCH and SIGMA_MAX, the top of Euler's and Heun's Karras grid, pass through).
# The caches (benchmarks/quality_cache_cuda.json, benchmarks/quality_tune_cuda/) resume from
# what is committed; the script packs them into $OUT/quality_cuda.tgz to unpack into benchmarks/.
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" EPSSCALE_CACHE="$PWD/.gpu_cache" PYTHONUNBUFFERED=1
OUT="${OUT:-out/gpu_quality}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
$PY -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/test_cuda.log" 2>&1
rc=$?
tail -3 "$OUT/test_cuda.log"
[ $rc = 0 ] || { echo "tests/test_cuda.py failed: see $OUT/test_cuda.log"; tail -60 "$OUT/test_cuda.log"; }
for b in ${SPEED_BATCHES:-256 1024}; do
  $PY benchmarks/speed.py --device cuda --batch "$b" --steps 10 --repeats 5 2>&1 | tee -a "$OUT/speed.log"
done
timeout "${BUDGET:-420}" $PY benchmarks/quality.py --device cuda --batch "${BATCH:-1000}" --steps "${STEPS:-10,20,50,100}" --samplers "${SAMPLERS:-ddpm,ddim,euler,heun}" ${SIGMA_MAX:+--karras-sigma-max "$SIGMA_MAX"} 2>&1 | grep --line-buffered -v "img/s" | tee "$OUT/quality.log"
$PY benchmarks/quality.py --report --device cuda --plot "$OUT/quality_cuda.png" > "$OUT/report.md"
tar -czf "$OUT/quality_cuda.tgz" benchmarks/quality_cache_cuda.json benchmarks/quality_tune_cuda
cat "$OUT/report.md"
