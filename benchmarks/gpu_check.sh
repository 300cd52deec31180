#!/usr/bin/env bash
# GPU check for a session with a lent CUDA device (one call; at most about 16 minutes of
# timeouts, typically 6-8: give the call timeout_s=600 and expect the tuning step to be cut).
#
#   0. the peers (torch-struct, pytorch-crf, qpth + cvxpy) from ./.whl if that folder exists
#      (`make gpu-wheels` fills it; carry `.whl` with the call: the device cannot reach an index);
#   1. the GPU tests (`pytest -m gpu`: every test parametrised by the `device` fixture runs on
#      CUDA, the fused Triton chain kernel compiled for real);
#   2. benchmarks/chain.py on CUDA at B=256, T=128, Z=32 against torch-struct and pytorch-crf,
#      fused and scaled kernels, with the bandwidth-floor line (3 x potential bytes / copy BW);
#   3. benchmarks/decode.py on CUDA: Viterbi and sampling (fused kernels, loops, peers);
#   4. benchmarks/hvp.py on CUDA: Hessian-vector products (fused sweeps, loops, double backward);
#   5. benchmarks/qp.py on CUDA, batch 128, n = 100, float32 and float64, against qpth;
#   6. benchmarks/precision.py on CUDA: float32 vs float64 error of the fused kernel's log Z,
#      marginals, entropy, KL and IFT VJP next to the peers (issue 10's targets);
#   7. benchmarks/hmm_scale.py --quick on CUDA: dense, low-rank and blocked HMMs vs Z;
#   8. benchmarks/sparsemap.py on CUDA (float32);
#   9. benchmarks/structures.py on CUDA: semi-Markov, projective and non-projective trees
#      against torch-struct (issue 12), and benchmarks/sparsemap.py --table trees on CUDA;
#  10. benchmarks/tune_fused.py: the fused kernel's warps / prefetch settings, timed.
# (Run order: tests, chain, QP, decode, HVP, precision, HMMs, SparseMAP, structures, tuning: the last
# steps are the first to be cut by the call's time limit.)
#
# Usage: bash benchmarks/gpu_check.sh   (PYTHON=... to pick the interpreter; output also in $OUT
# when that variable names a directory, as on the lent machines).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
LOG="${OUT:-/tmp}/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # structift from this checkout
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  status=0
  echo "== device"
  "$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "CUDA is not available: this script needs a GPU"
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())
PYEOF
  [ $? -eq 0 ] || exit 2

  # Targets first (issue 2: chain; issue 5: QP), then the other kernels, then tuning: if the
  # call runs out of time, what matters most is already in the log.
  echo "== pytest -m gpu"
  # The device image has another torch (2.11): its deprecation notices are shown, not fatal.
  timeout 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider --maxfail=10 \
    -W "default::DeprecationWarning" -W "default::FutureWarning" || status=1

  echo "== benchmark (CUDA, B=256 T=128 Z=32)"
  timeout 120 "$PY" benchmarks/chain.py --device cuda -B 256 -T 128 -Z 32 \
    --floor --repeats 20 --ts-work 1e12 || status=1

  echo "== QP benchmark (CUDA, batch 128, n = 100)"
  timeout 90 "$PY" benchmarks/qp.py --device cuda --n 100 || status=1

  echo "== Viterbi + sampling benchmark (CUDA, B=256 T=128 Z=32)"
  timeout 60 "$PY" benchmarks/decode.py --device cuda -B 256 || status=1

  echo "== Hessian-vector product benchmark (CUDA, B=256 T=128 Z=32)"
  timeout 60 "$PY" benchmarks/hvp.py --device cuda -B 256 --ts-work 1e12 || status=1

  echo "== float32 precision (CUDA, fused kernel vs peers)"
  timeout 90 "$PY" benchmarks/precision.py --device cuda --T 1000 --scales 1 30 100 || status=1

  echo "== large HMMs (CUDA, --quick: dense / low-rank / blocked, Z up to 2^14)"
  timeout 90 "$PY" benchmarks/hmm_scale.py --device cuda --quick || status=1

  echo "== SparseMAP (CUDA, float32: active set vs the enumerated QP, scaling in T and Z)"
  timeout 60 "$PY" benchmarks/sparsemap.py --device cuda --dtype float32 || status=1

  echo "== semi-Markov and dependency trees vs torch-struct (CUDA)"
  timeout 60 "$PY" benchmarks/structures.py --device cuda || status=1

  echo "== SparseMAP on dependency trees (CUDA, float32)"
  timeout 45 "$PY" benchmarks/sparsemap.py --device cuda --dtype float32 --table trees || status=1

  echo "== fused kernel launch settings (CUDA, B=256 T=128 Z=32)"
  timeout 120 "$PY" benchmarks/tune_fused.py --device cuda || status=1
  echo "== exit status $status"
  exit "$status"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
