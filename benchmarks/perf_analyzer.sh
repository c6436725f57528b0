#!/usr/bin/env bash
# Triton's own load tool, perf_analyzer, against `dmf-export serve` of a fresh `-f triton`
# repository, over HTTP and gRPC at a concurrency sweep, next to the in-process time of the
# same episode (onnxruntime on the same model.onnx, same intra-op threads).
#
#   benchmarks/perf_analyzer.sh [--size 2w1s2q] [--concurrency 1,2,4] [--protocols grpc,http]
#       [--instances N] [--threads T] [--image-size 84] [--checkpoint CK]
#       [--server-env ENV] [--interval-ms 4000] [--keep DIR]
#
# PYTHON (default python3) is an interpreter with dmf-export's dependencies; the server's
# environment is --server-env or $DMF_TRITON_ENV (numpy < 2, nvidia-pytriton, onnxruntime).
# --instances/--threads are export's; unset, export's defaults.
#
# What it installs, once (README, "Serving"): perf_analyzer comes in the tritonclient 2.51
# wheel (bin/perf_analyzer; the server is 2.51 too), installed without its Python
# dependencies into benchmarks/.venv-perf (gitignored; never CI's .venv, which pins another
# tritonclient); the binary links libcudart.so.12, which the nvidia-cuda-runtime-cu12 wheel
# in the same venv provides (no GPU is used), and libb64.so.0d from Debian's libb64-0d
# (apt-get, needs root). The server listens on loopback ports picked free; every process
# the script starts is stopped on exit (the serve command stops tritonserver and its
# stubs on SIGTERM; their process group is killed if anything is left). Each perf_analyzer
# run is bounded (--max-trials, and `timeout`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
SIZE=2w1s2q CONCURRENCY=1,2,4 PROTOCOLS=grpc,http INSTANCES= THREADS= IMAGE=84
CHECKPOINT= SERVER_ENV="${DMF_TRITON_ENV:-}" INTERVAL_MS=4000 KEEP=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --size) SIZE="$2"; shift 2 ;;
    --concurrency) CONCURRENCY="$2"; shift 2 ;;
    --protocols) PROTOCOLS="$2"; shift 2 ;;
    --instances) INSTANCES="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --image-size) IMAGE="$2"; shift 2 ;;
    --checkpoint) CHECKPOINT="$2"; shift 2 ;;
    --server-env) SERVER_ENV="$2"; shift 2 ;;
    --interval-ms) INTERVAL_MS="$2"; shift 2 ;;
    --keep) KEEP="$2"; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "Error: unknown argument $1" >&2; exit 2 ;;
  esac
done

PERF_VENV="$ROOT/benchmarks/.venv-perf"
TRITONCLIENT_VERSION=2.51.0          # the server's release (nvidia-pytriton 0.7.0 ships 2.51)
CUDA_RUNTIME_VERSION=12.6.77         # any 12.x wheel gives libcudart.so.12

install_perf_analyzer() {
  if ! ldconfig -p | grep -q 'libb64.so.0d'; then
    if [[ $(id -u) -ne 0 ]]; then
      echo "Error: perf_analyzer needs Debian's libb64-0d: sudo apt-get install -y libb64-0d" >&2; exit 2
    fi
    echo "installing libb64-0d (apt-get)" >&2
    apt-get install -y -q -o DPkg::Lock::Timeout=300 libb64-0d >/dev/null \
      || { apt-get update -q >/dev/null && apt-get install -y -q -o DPkg::Lock::Timeout=300 libb64-0d >/dev/null; }
  fi
  if [[ ! -x "$PERF_VENV/bin/perf_analyzer" ]]; then
    echo "installing perf_analyzer into $PERF_VENV (tritonclient $TRITONCLIENT_VERSION, nvidia-cuda-runtime-cu12)" >&2
    python3 -m venv "$PERF_VENV"
    "$PERF_VENV/bin/pip" install -q --no-deps "tritonclient==$TRITONCLIENT_VERSION" \
      "nvidia-cuda-runtime-cu12==$CUDA_RUNTIME_VERSION"
  fi
  CUDART_LIB="$(echo "$PERF_VENV"/lib/python3*/site-packages/nvidia/cuda_runtime/lib)"
}

SCRATCH="$(mktemp -d -t dmf-perf-analyzer-XXXXXX)"
SERVE_PID= SERVER_GROUP=
cleanup() {
  if [[ -n "$SERVE_PID" ]] && kill -0 "$SERVE_PID" 2>/dev/null; then
    kill -TERM "$SERVE_PID" 2>/dev/null || true
    for _ in $(seq 1 300); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVE_PID" 2>/dev/null || true
  fi
  if [[ -n "$SERVER_GROUP" ]] && pgrep -g "$SERVER_GROUP" >/dev/null 2>&1; then
    kill -KILL -- "-$SERVER_GROUP" 2>/dev/null || true
  fi
  if [[ -n "$KEEP" ]]; then mkdir -p "$KEEP" && cp "$SCRATCH"/*.csv "$SCRATCH"/*.log "$KEEP"/ 2>/dev/null || true; fi
  rm -rf "$SCRATCH"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

install_perf_analyzer
cd "$ROOT"

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $(uptime | sed 's/.*load/load/')" >&2
if [[ -z "$CHECKPOINT" ]]; then
  CHECKPOINT="$SCRATCH/dmf.pth.tar"
  "$PYTHON" -c "import sys; from dmf_export.synthetic import write_random_checkpoint as w; w(sys.argv[1], groups=64, kernel=1, seed=0)" "$CHECKPOINT"
fi
EXPORT_FLAGS=(--image-size "$IMAGE" --no-verify)
[[ -n "$INSTANCES" ]] && EXPORT_FLAGS+=(--instances "$INSTANCES")
[[ -n "$THREADS" ]] && EXPORT_FLAGS+=(--threads "$THREADS")
"$PYTHON" cli.py export "$CHECKPOINT" -f triton -o "$SCRATCH/repo" "${EXPORT_FLAGS[@]}" >&2
sed -n '/instance_group/,/^]/p;/thread/,+1p' "$SCRATCH/repo/dmf_python/config.pbtxt" | tr -s ' \n' ' ' >&2; echo >&2

# the episode, as perf_analyzer's input-data JSON (what the suite checks the server accepts)
"$PYTHON" - "$SCRATCH/input.json" "$SIZE" "$IMAGE" <<'EOF'
import sys
from dmf_export.contract import parse_sizes
from dmf_export.triton import write_perf_analyzer_data
(size,) = parse_sizes(sys.argv[2])
write_perf_analyzer_data(sys.argv[1], size, int(sys.argv[3]))
EOF

read -r HTTP_PORT GRPC_PORT METRICS_PORT < <("$PYTHON" -c "from dmf_export.triton import free_ports; print(*free_ports(3))")
SERVE_FLAGS=(--http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" --model dmf_python)
[[ -n "$SERVER_ENV" ]] && SERVE_FLAGS+=(--server-env "$SERVER_ENV")
"$PYTHON" cli.py serve "$SCRATCH/repo" "${SERVE_FLAGS[@]}" >"$SCRATCH/serve.log" 2>&1 &
SERVE_PID=$!
for _ in $(seq 1 1800); do
  grep -q '^Ctrl-C' "$SCRATCH/serve.log" && break
  kill -0 "$SERVE_PID" 2>/dev/null || { cat "$SCRATCH/serve.log" >&2; exit 1; }
  sleep 0.1
done
grep -q '^Ctrl-C' "$SCRATCH/serve.log" || { echo "Error: the server did not start in 180 s" >&2; exit 1; }
SERVER_GROUP="$(pgrep -P "$SERVE_PID" -f tritonserver | head -1)"  # its own process group

server_counters() {  # user+system seconds of the server's process group (server and stubs), requests answered
  local cpu answered
  cpu=$(ps -o times= -g "$SERVER_GROUP" 2>/dev/null | awk '{s += $1} END {print s + 0}')
  answered=$(curl -s "http://127.0.0.1:$HTTP_PORT/v2/models/dmf_python/stats" \
    | "$PYTHON" -c "import json, sys; print(json.load(sys.stdin)['model_stats'][0]['inference_stats']['success']['count'])")
  echo "$cpu $answered"
}

# in-process with the threads the served instance has (0: onnxruntime's default)
SERVED_THREADS=$(sed -n '/"intra_op_threads"/{n;s/.*string_value: "\([0-9]*\)".*/\1/p}' "$SCRATCH/repo/dmf_python/config.pbtxt")
"$PYTHON" - "$SCRATCH/repo/dmf_python/1/model.onnx" "$SCRATCH/input.json" "${SERVED_THREADS:-0}" \
  >"$SCRATCH/inprocess.csv" <<'EOF'
import base64, json, sys, time
import numpy as np, onnxruntime as ort
model, data, threads = sys.argv[1], json.load(open(sys.argv[2]))["data"][0], int(sys.argv[3])
feeds = {k: np.frombuffer(base64.b64decode(v["content"]["b64"]), "<f4").reshape(v["shape"]) for k, v in data.items()}
options = ort.SessionOptions()
options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
session.run(None, feeds)
times, start = [], time.perf_counter()
while len(times) < 5 or (time.perf_counter() - start < 10 and len(times) < 200):
    t = time.perf_counter(); session.run(None, feeds); times.append(time.perf_counter() - t)
q = lambda p: 1e6 * float(np.percentile(times, p))
print("Concurrency,Inferences/Second,p50 latency,p90 latency,p99 latency")
print(f"1,{len(times) / sum(times):.3f},{q(50):.0f},{q(90):.0f},{q(99):.0f}")
EOF

IFS=, read -ra PROTOS <<<"$PROTOCOLS"
IFS=, read -ra LEVELS <<<"$CONCURRENCY"
# the protocols take turns at each concurrency: on a shared machine, load that comes and
# goes then falls on both alike
TIMEFORMAT='%U %S'
for c in "${LEVELS[@]}"; do
  for protocol in "${PROTOS[@]}"; do
    port=$([[ $protocol == grpc ]] && echo "$GRPC_PORT" || echo "$HTTP_PORT")
    echo "perf_analyzer -i $protocol, concurrency $c" >&2
    before=$(server_counters)
    { time LD_LIBRARY_PATH="$CUDART_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" timeout 600 \
      "$PERF_VENV/bin/perf_analyzer" -m dmf_python -u "127.0.0.1:$port" -i "$protocol" \
      --input-data "$SCRATCH/input.json" --concurrency-range "$c:$c" \
      --measurement-interval "$INTERVAL_MS" --max-trials 6 --stability-percentage 20 \
      -f "$SCRATCH/$protocol-$c.csv" >"$SCRATCH/$protocol-$c.log" 2>&1 \
      || { tail -5 "$SCRATCH/$protocol-$c.log" >&2; echo "(perf_analyzer exited; unstable figures are still written)" >&2; }
    } 2>"$SCRATCH/$protocol-$c.client-cpu"
    echo "$(server_counters) $before" >"$SCRATCH/$protocol-$c.cpu"
  done
done

"$PYTHON" - "$SCRATCH" "$PROTOCOLS" "$CONCURRENCY" "$SIZE" <<'EOF'
import csv, sys
from pathlib import Path
scratch, protocols, levels, size = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split(","), sys.argv[4]
def row(path):
    with open(path) as f:
        return next(csv.DictReader(f))
ms = lambda r, k: f"{float(r[k]) / 1e3:8.1f}" if r.get(k) else "       -"
print(f"{size}: p50/p90/p99 latency ms, infer/s; server queue and compute ms per request (perf_analyzer's);"
      " CPU s per request of the server (and its stubs) and of perf_analyzer")
print(f"{'backend':<22}{'conc':>5}{'infer/s':>9}{'p50':>9}{'p90':>9}{'p99':>9}{'queue':>9}{'compute':>9}"
      f"{'srv cpu':>9}{'pa cpu':>9}")
inproc = row(scratch / "inprocess.csv")
print(f"{'in-process ort':<22}{1:>5}{float(inproc['Inferences/Second']):>9.2f}{ms(inproc, 'p50 latency')}"
      f"{ms(inproc, 'p90 latency')}{ms(inproc, 'p99 latency')}")
for protocol in protocols:
    first = None
    for c in levels:
        path = scratch / f"{protocol}-{c}.csv"
        if not path.exists():
            log = [line for line in (scratch / f"{protocol}-{c}.log").read_text().splitlines() if line.strip()]
            print(f"{'triton ' + protocol:<22}{c:>5}  (no result: {log[-2] if len(log) > 1 else 'no output'})")
            continue
        r = row(path)
        rate = float(r["Inferences/Second"])
        first = first or rate
        cpu_after, count_after, cpu_before, count_before = (
            float(x) for x in (scratch / f"{protocol}-{c}.cpu").read_text().split())
        client_cpu = sum(float(x) for x in (scratch / f"{protocol}-{c}.client-cpu").read_text().split()[-2:])
        compute = sum(float(r[k]) for k in ("Server Compute Input", "Server Compute Infer", "Server Compute Output"))
        count = count_after - count_before
        print(f"{'triton ' + protocol:<22}{c:>5}{rate:>9.2f}{ms(r, 'p50 latency')}{ms(r, 'p90 latency')}"
              f"{ms(r, 'p99 latency')}{ms(r, 'Server Queue')}{compute / 1e3:>9.1f}"
              f"{'' if not count else f'{(cpu_after - cpu_before) / count:9.3f}{client_cpu / count:9.3f}'}"
              f"   ({rate / first:.2f} × concurrency {levels[0]})")
EOF
