#!/usr/bin/env bash
# int8 ONNX ÷ fp32 ONNX on a CPU: the episode graph and the encoder alone, one `bench` run.
#
#   benchmarks/int8_bench.sh [OUT_DIR] [THREADS]     (default /tmp/dmf-int8-bench, 2)
#
# A seeded random checkpoint and a synthetic 20-class image-folder split (calibration:
# its first 4 episodes' distinct images, the default method); exports fp32 and int8 ONNX,
# episode and split, then times them on a 5w1s75q episode (84×84) and prints each int8
# row ÷ the fp32 row of the same graph (bench's own vs_fp32 divides a split artifact by
# the first fp32 ONNX artifact, here the episode graph).
# Not a test: run it on a quiet machine; print the CPU's flags with the figures
# (grep -o 'avx512_vnni\|avx_vnni\|amx_int8' /proc/cpuinfo | sort -u).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/dmf-int8-bench}
THREADS=${2:-2}
PY=${PYTHON:-python}
mkdir -p "$OUT"
CK=$OUT/dmf.pth.tar
"$PY" -c "import sys; from dmf_export.synthetic import write_random_checkpoint, write_synthetic_split; \
write_random_checkpoint(sys.argv[1]); write_synthetic_split(sys.argv[2], classes=20, images=30)" "$CK" "$OUT/data"
for args in "" "--graph split" "--precision int8 --calibrate $OUT/data" "--precision int8 --calibrate $OUT/data --graph split"; do
    # shellcheck disable=SC2086
    "$PY" cli.py export "$CK" -f onnx $args --no-verify --force
done
"$PY" cli.py bench "$OUT/dmf.onnx" "$OUT/dmf.int8.onnx" "$OUT/dmf.encoder.onnx" "$OUT/dmf.int8.encoder.onnx" \
    -c "$CK" --sizes 5w1s75q --threads "$THREADS" --no-eager --no-backbone --json > "$OUT/bench.json"
"$PY" - "$OUT/bench.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
median = {row["name"]: row["median_s"] for row in rows}
for row in rows:
    twin = median.get(row["name"].replace(".int8.", "."))  # the fp32 file of the same graph
    ratio = f"{row['median_s'] / twin:.2f}× its fp32 twin" if ".int8." in row["name"] and twin else ""
    print(f"{row['name']:<60} median {row['median_s'] * 1e3:8.1f} ms  {ratio}")
PY
