#!/usr/bin/env bash
# The benchmark on a GPU: every group of benchmarks/bench_all.py on the 12-layer GPT-2-small tree, with the
# fraction of the memory-bandwidth bound each plain step reaches, as one JSON (and the table on stdout).
#
#   OUT=/some/dir PEAK_GBPS=4800 bash benchmarks/gpu.sh
#
# PEAK_GBPS: the GPU's peak memory bandwidth in GB/s (default 4800, the H200's HBM3e); OUT: where the JSON
# goes (default benchmarks/results). Runs with the python3 on the PATH (it needs jax with a GPU backend,
# optax, flax), from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
python3 -c "import jax, sys; d = jax.devices()[0]; print(d.platform, d.device_kind, 'jax', jax.__version__); \
sys.exit(0 if d.platform == 'gpu' else 'no GPU backend: this script is for a GPU machine')"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 benchmarks/bench_all.py --layers 12 --repeats "${REPEATS:-20}" --peak-gbps "${PEAK_GBPS:-4800}" \
    --json "$out/gpu_12_layers.json"
