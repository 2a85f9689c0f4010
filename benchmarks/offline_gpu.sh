#!/usr/bin/env bash
# The GPU benchmark (benchmarks/components.py --device gpu) on a Linux CUDA machine that cannot reach PyPI but has
# CUDA 13, PyTorch and transformers installed (as the cloud GPU images do): mlx-sd's side needs MLX's CUDA build,
# torch's side diffusers.
#
#   bash benchmarks/offline_gpu.sh fetch DIR [MB]    # where pip works: the missing wheels into DIR, each file over
#                                                    # MB megabytes (default: none) cut into parts, for copies that
#                                                    # cap a file's or a transfer's size
#   bash benchmarks/offline_gpu.sh run DIR [ARGS]    # on the GPU machine, in this checkout: joins the parts, installs
#                                                    # the wheels and mlx-sd into its python3, then runs
#                                                    # components.py --device gpu ARGS
#
# PYTHON_VERSION (default 3.12) is the GPU machine's Python, which need not be this one's.
set -euo pipefail
cmd=${1:?usage: offline_gpu.sh fetch DIR [MB] | run DIR [ARGS]}
dir=$(realpath -m "${2:?usage: offline_gpu.sh fetch DIR [MB] | run DIR [ARGS]}")
shift 2
cd "$(dirname "$0")/.."

case $cmd in
fetch)
    # The versions this checkout is tested with: the MLX installed here, the diffusers setup.cfg's tests pin.
    mlx_version=$(python3 -c 'import mlx.core as mx; print(mx.__version__)')
    diffusers_version=$(sed -n 's/^ *diffusers==\([0-9.]*\).*/\1/p' setup.cfg)
    : "${diffusers_version:?no diffusers==X.Y.Z pin found in setup.cfg}"
    mkdir -p "$dir"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
        --python-version "${PYTHON_VERSION:-3.12}" --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
        "mlx==$mlx_version" "mlx-cuda-13==$mlx_version" "diffusers==$diffusers_version" importlib_metadata ftfy wcwidth
    if [ -n "${1:-}" ]; then
        for f in "$dir"/*.whl; do
            if [ "$(stat -c %s "$f")" -gt $(($1 * 1000000)) ]; then
                split -b "$(($1 * 1000000))" -d "$f" "$f.part-" && rm "$f"
            fi
        done
    fi
    ls -l "$dir"
    ;;
run)
    for first in "$dir"/*.whl.part-00; do
        [ -e "$first" ] || continue
        whl=${first%.part-00}
        cat "$whl".part-* >"$whl.tmp" && mv "$whl.tmp" "$whl"
    done
    python3 -m pip install --quiet --no-index --no-deps "$dir"/*.whl
    python3 -m pip install --quiet --no-index --no-deps --no-build-isolation .
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.device_info(mx.gpu))'
    PYTHONUNBUFFERED=1 python3 benchmarks/components.py --device gpu "$@"
    ;;
*)
    echo "offline_gpu.sh: unknown command $cmd (fetch or run)" >&2
    exit 2
    ;;
esac
