#!/usr/bin/env bash
# Everything this project measures on a GPU, in one run (a device session calls it once).
#
#   bash benchmarks/gpu_check.sh [OUT]      OUT: results folder (default $OUT, else ./gpu-check)
#
# From a checkout, nothing installed: python3 with a CUDA torch, nvcc, ninja, pytest, click,
# torchdiffeq, onnx, onnxscript and onnxruntime (torchvision optional: the DCN comparison).
# Steps, each with its own time limit, go on after a failure; the summary is on stdout,
# everything in OUT/gpu_check.log, the measurements as JSON beside it:
#   1. build dmf::deform_conv2d with its CUDA kernel;
#   2. the CUDA tests (op vs reference and CPU op, eager model, deployment graph in fp16,
#      TorchScript fp32/fp16, CUDA graphs); then tests/test_tensorrt.py where the TensorRT
#      Python package is installed (TENSORRT_ROOT for the plugin's headers);
#   3. the DCN on DMF's shapes: CUDA vs CPU parity, ours vs torchvision   → dcn.json;
#   4. export TorchScript fp32 and fp16 and a CUDA AOTInductor package (fp32) from a seeded
#      random checkpoint (G 64, K 1, 84×84);
#   5. verify them on the GPU, plain and from CUDA graphs, and fp32 with TF32;
#   6. bench, eager original vs the artifacts: IEEE fp32    → bench.json,
#      with CUDA graphs → bench_graph.json, with TF32 → bench_tf32.json.
# QUICK=1 trims step 6 to 5w1s75q; REPEATS (default 50) episodes per bench row;
# DEVICE=cpu runs the plumbing on a machine without a GPU (the GPU-only steps fail).
set -u
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
log="$out/gpu_check.log"
: >"$log"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export DMF_EXPORT_CACHE=${DMF_EXPORT_CACHE:-/tmp/dmf-export-cache}
# this GPU's code only (the op's and the plugin's builds): a third of the default's compile time
export DMF_EXPORT_CUDA_ARCHS=${DMF_EXPORT_CUDA_ARCHS:-$(python3 -c \
  'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)}
py=${PYTHON:-python3}
work=$(mktemp -d)
device=${DEVICE:-cuda}
repeats=${REPEATS:-50}
sizes=5w1s75q,5w5s75q
[ "${QUICK:-0}" = 1 ] && sizes=5w1s75q
failed=0

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "===== $name: $*" >>"$log"
  timeout "$limit" bash -c '"$@"' "$name" "$@" >>"$log" 2>&1
  rc=$?
  [ $rc = 0 ] || failed=$((failed + 1))
  echo "$name: rc $rc, $((SECONDS - t0)) s" | tee -a "$log"
}
cli() { "$py" -m dmf_export "$@"; }
json() {  # json FILE COMMAND...: stdout to FILE (valid JSON or nothing), stderr to the log
  local file=$1
  shift
  "$@" >"$file.tmp" && mv "$file.tmp" "$file" || { local rc=$?; rm -f "$file.tmp"; return $rc; }
}
export -f cli json
export py

step environment 60 sh -c "nvidia-smi -L; nvcc --version | tail -n 2; $py -c 'import torch, onnxruntime;
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name());
print(\"onnxruntime\", onnxruntime.__version__)'"
step build 600 "$py" -c "from dmf_export import ops; info = ops.require(); print(info); assert info.with_cuda"
step tests 600 "$py" -m pytest -q -p no:cacheprovider -p no:logging -rs -k cuda \
  tests/test_ops.py tests/test_model.py tests/test_export.py tests/test_deploy.py
if "$py" -c "import tensorrt" >/dev/null 2>&1; then
  step tensorrt 600 "$py" -m pytest -q -p no:cacheprovider -p no:logging -rs tests/test_tensorrt.py
else
  echo "tensorrt: not run (no TensorRT Python package)" | tee -a "$log"
fi
step dcn 300 json "$out/dcn.json" "$py" benchmarks/bench_deform_conv.py --no-cpu --runs 20 --json
step checkpoint 60 "$py" -c "from dmf_export.synthetic import write_random_checkpoint as w; w('$work/ck.pth.tar')"
step export-fp32 300 cli export "$work/ck.pth.tar" -f torchscript -o "$work/ck.ts" --no-verify
step export-fp16 300 cli export "$work/ck.pth.tar" -f torchscript --precision fp16 -o "$work/ck.fp16.ts" --no-verify
step export-aoti 400 cli export "$work/ck.pth.tar" -f aoti --device cuda -o "$work/ck.pt2" --no-verify
for ts in ck.ts ck.fp16.ts ck.pt2; do
  step "verify-$ts" 300 cli verify "$work/$ts" -c "$work/ck.pth.tar" --device "$device"
  step "verify-$ts-graph" 300 cli verify "$work/$ts" -c "$work/ck.pth.tar" --device "$device" --cuda-graph \
    --sizes 5w1s75q,5w5s15q
done
step verify-ck.ts-tf32 300 cli verify "$work/ck.ts" -c "$work/ck.pth.tar" --device "$device" --tf32
bench=(cli bench "$work/ck.ts" "$work/ck.fp16.ts" "$work/ck.pt2" -c "$work/ck.pth.tar" --device "$device" --repeats "$repeats" --json)
step bench 600 json "$out/bench.json" "${bench[@]}" --sizes "$sizes"
step bench-graph 600 json "$out/bench_graph.json" "${bench[@]}" --sizes "$sizes" --cuda-graph --no-backbone
step bench-tf32 600 json "$out/bench_tf32.json" "${bench[@]}" --sizes 5w1s75q --tf32
for f in "$out"/bench*.json; do
  [ -f "$f" ] && "$py" - "$f" <<'PY' | tee -a "$log"
import json, sys
rows = json.load(open(sys.argv[1]))
print(sys.argv[1].rsplit("/", 1)[-1])
for r in rows:
    speed = f"{r['speedup']:.2f}x eager" if r["speedup"] else ""
    floor = f"{r['vs_backbone']:.2f} of backbone" if r.get("vs_backbone") else ""
    gpu = f"{r['gpu_peak_mb']:.0f} MB" if r.get("gpu_peak_mb") else ""
    print(f"  {r['size']:<8} {r['name'][-40:]:<40} median {r['median_s'] * 1e3:8.2f} ms  "
          f"min {r['min_s'] * 1e3:8.2f} ms  {speed:>11} {floor:>17} {gpu:>8}")
PY
done
rm -rf "$work"
echo "steps failed: $failed" | tee -a "$log"
exit $((failed > 0))
