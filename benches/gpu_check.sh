#!/usr/bin/env bash
# One-call GPU check: install gradcore, run the GPU tests, then the GPU benchmark.
#
# Meant for a machine with an NVIDIA GPU, CuPy, PyTorch, pytest and hypothesis but no
# network (python3 there is 3.12). What it lacks travels as wheels in .whl/ at the repo
# root. Prepare them once, on a machine with network, in the repo root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl array-api-compat==1.16 array-api-strict==2.6 setuptools==80.9.0
#
# (pure-Python py3-none-any wheels, about 1.4 MiB together; setuptools because the
# package's SPDX license field needs setuptools >= 77 and the machine's may be older,
# and --no-build-isolation builds with whatever is importable). Then run this
# script from the repo root on the GPU machine, with .whl/ copied there, allowing about 9
# minutes; it keeps itself under 8 (pytest <= 330 s, benchmark <= 140 s):
#
#   bash benches/gpu_check.sh
#
# The last lines printed are the benchmark's table; the pytest summary comes before it.
# Set GPU_CHECK_QUICK=1 for a short benchmark, PYTHON=... for another interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

echo "== device"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi not found"
"$PY" -c "import cupy, sys; print('python', sys.version.split()[0], 'cupy', cupy.__version__)" \
    || { echo "CuPy is missing on this machine: nothing to check"; exit 1; }

echo "== install"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gradcore-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/gradcore-site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -m pip install -q --no-index --no-build-isolation --no-deps . || exit 1
# -P: never put the checkout on sys.path, so the installed gradcore (with its
# gradcore.backends package) is the one imported.
"$PY" -P -c "import array_api_compat, gradcore, gradcore.backends.cupy; print('gradcore', gradcore.__file__)" \
    || exit 1

echo "== GPU tests (every gpu-marked test, CuPy parametrisations included)"
timeout 330 "$PY" -P -m pytest -q -m gpu -p no:cacheprovider --gradcore-backends=cupy \
    tests/ 2>&1 | tail -n 60
tests_status=${PIPESTATUS[0]}

echo "== GPU benchmark"
bench_args=()
[ "${GPU_CHECK_QUICK:-0}" = "1" ] && bench_args+=(--quick)
timeout 140 "$PY" -P benches/gpu_bench.py --runs 30 "${bench_args[@]}"
bench_status=$?

echo "pytest exit status: $tests_status; benchmark exit status: $bench_status"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
