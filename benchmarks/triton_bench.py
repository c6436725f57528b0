"""Episodes through a real Triton server next to the same ONNX graph in-process.

    python benchmarks/triton_bench.py [--checkpoint CKPT] [--size 5w1s75q] [--clients 1,2,4]
        [--episodes 3] [--rounds 2] [--threads 2] [--instances 1] [--protocols grpc,http] [--server-env ENV] [--json]

The episode graph is exported once (``export --format triton``: the default seeded checkpoint,
groups 64, kernel 1, 84×84, unless ``--checkpoint``) and served by the nvidia-pytriton
wheel's tritonserver through the python-backend model (onnxruntime inside the server,
``--threads`` intra-op threads per instance). The in-process reference is an onnxruntime
session on the same ``model.onnx`` with the same thread count and options, called from the
same number of client threads. At each client count the backends take turns, round by
round (the CPU may be shared: turns spread other load over all alike); in each round each
client sends one untimed warm-up episode, then ``--episodes`` timed ones; p50/p99 are over all clients' episodes (with few episodes p99
is close to the maximum) and episodes/s is the total over the wall time of the timed part.
``overhead`` is the server's p50 over the in-process p50 at the same client count.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dmf_export.contract import EPISODE_INPUTS, make_episode, parse_sizes  # noqa: E402
from dmf_export.export import ExportOptions, export_checkpoint  # noqa: E402
from dmf_export.formats import read_info  # noqa: E402
from dmf_export.synthetic import write_random_checkpoint  # noqa: E402
from dmf_export.triton import EPISODE_MODEL, TritonRunner, TritonServer, model_path, write_repository  # noqa: E402


def run_clients(make_call, clients: int, episodes: int) -> tuple[list[float], float]:
    """(per-episode seconds of every client, wall seconds) for ``clients`` threads each
    making ``episodes`` timed calls after one warm-up call."""
    latencies, errors = [], []
    lock, ready = threading.Lock(), threading.Barrier(clients + 1)
    done = threading.Barrier(clients + 1)

    def client():
        try:
            call = make_call()
            call()
        except BaseException as err:  # noqa: BLE001 (reported below, after the barriers)
            errors.append(err)
            call = None
        ready.wait()
        mine = []
        for _ in range(episodes if call else 0):
            start = time.perf_counter()
            call()
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)
        done.wait()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    done.wait()
    wall = time.perf_counter() - start
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return latencies, wall


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(name: str, clients: int, latencies: list[float], wall: float) -> dict:
    return {"backend": name, "clients": clients, "episodes": len(latencies),
            "p50_ms": 1e3 * statistics.median(latencies), "p99_ms": 1e3 * percentile(latencies, 99),
            "episodes_per_s": len(latencies) / wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--size", default="5w1s75q")
    parser.add_argument("--clients", default="1,2,4")
    parser.add_argument("--episodes", type=int, default=3, help="timed episodes per client and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, alternating the backends")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--instances", type=int, default=1, help="model instances in the server")
    parser.add_argument("--protocols", default="grpc,http")
    parser.add_argument("--server-env", help="environment with nvidia-pytriton (default $DMF_TRITON_ENV)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    (size,) = parse_sizes(args.size)
    clients = [int(c) for c in args.clients.split(",")]
    protocols = [p for p in args.protocols.split(",") if p]
    rows = []
    with tempfile.TemporaryDirectory(prefix="dmf-triton-bench-") as scratch:
        scratch = Path(scratch)
        checkpoint = args.checkpoint or str(write_random_checkpoint(scratch / "dmf.pth.tar", groups=64,
                                                                    kernel=1, seed=0))
        print(f"exporting {checkpoint}", file=sys.stderr)
        export_checkpoint(checkpoint, ExportOptions(format="triton", output=str(scratch / "exported")),
                      lambda m: print(m, file=sys.stderr))
        onnx_file = model_path(scratch / "exported")  # the episode graph the served model runs
        repo = scratch / "repo"
        write_repository(repo, {onnx_file: read_info(onnx_file)}, threads=args.threads, instances=args.instances)

        support, labels, query = make_episode(size, seed=0)
        feeds = {name: t.numpy() for name, t in zip(EPISODE_INPUTS, (support, labels, query))}
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        with TritonServer(repo, server_env=args.server_env, models=[EPISODE_MODEL]) as server:
            def triton_call(protocol):
                def make_call():
                    runner = TritonRunner(server, EPISODE_MODEL, protocol=protocol, timeout=600)
                    return lambda: runner.infer(feeds)
                return make_call

            backends = {"onnxruntime in-process": lambda: lambda: session.run(None, feeds),
                        **{f"triton {p} (python backend)": triton_call(p) for p in protocols}}
            for n in clients:
                latencies = {name: [] for name in backends}
                walls = dict.fromkeys(backends, 0.0)
                # the CPU is shared: alternating the backends round by round spreads the
                # other load over all of them alike
                for round_ in range(args.rounds):
                    for name, make_call in backends.items():
                        print(f"{name}, {n} client(s), round {round_ + 1}", file=sys.stderr)
                        times, wall = run_clients(make_call, n, args.episodes)
                        latencies[name] += times
                        walls[name] += wall
                reference = None
                for name in backends:
                    row = summary(name, n, latencies[name], walls[name])
                    if reference is None:
                        reference = row["p50_ms"]
                    else:
                        row["overhead"] = row["p50_ms"] / reference
                    rows.append(row)
    if args.json:
        print(json.dumps({"size": str(size), "threads": args.threads, "instances": args.instances,
                          "rows": rows}, indent=2))
        return 0
    print(f"{size}, onnxruntime {args.threads} intra-op threads, {args.instances} server instance(s), "
          f"{args.rounds} rounds × {args.episodes} timed episodes per client")
    print(f"{'backend':<32}{'clients':>8}{'p50 ms':>10}{'p99 ms':>10}{'episodes/s':>12}{'÷ in-process':>14}")
    for row in rows:
        ratio = f"{row['overhead']:.3f}" if "overhead" in row else ""
        print(f"{row['backend']:<32}{row['clients']:>8}{row['p50_ms']:>10.1f}{row['p99_ms']:>10.1f}"
              f"{row['episodes_per_s']:>12.3f}{ratio:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
