#!/usr/bin/env bash
# One command for the GPU figures (issue 15): sampling per NFE (fp32 / bf16 / compiled / CUDA graph),
# seconds per volume at K = 1, 4, 10 and 1000 (extrapolated), train step fp32 / bf16 / activation
# checkpointing with peak memory, loader throughput and the DWT. Writes benchmarks/results/gpu_suite.json.
#   bash benchmarks/gpu_suite.sh                        # on a machine with a CUDA GPU
#   bash benchmarks/gpu_suite.sh --device cpu --quick   # the same code on tiny shapes (a smoke run)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" benchmarks/gpu_suite.py "$@"
