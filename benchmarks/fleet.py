"""Episodes per second of ``dmf-export evaluate --server`` against one local Triton server
and against two as a fleet, with 1, 2 and 4 clients.

    python benchmarks/fleet.py [--episodes 20] [--clients 1,2,4] [--out DIR] [--json]

Writes (once, into ``--out``) a synthetic 84×84 split (``evaluate_speed.py``'s writer, the
pickle layout), ``dmf-export demo``'s seeded random checkpoint and its split Triton
repository (``--graph split``: ``dmf``, ``dmf_encoder``, ``dmf_head``; one instance of one
intra-op thread each unless ``--threads``). Then starts one server from the
nvidia-pytriton wheel (``dmf_export.triton.TritonServer``: loopback only, free ports,
stopped with its stubs whatever happens) and runs, each in its own process,

    dmf-export evaluate --server URL [--server URL2] --clients N --data DATA --episodes E --json

for each N, first against that server, then with a second server on the same repository
against both (the requests spread round robin). ``--evaluate-arg`` passes more to every
evaluate (``--evaluate-arg=--no-feature-cache`` for the uncached path). Each evaluate is
bounded by ``--run-timeout`` seconds. Each row says which path ran (``path``: ``cached``,
the encoder and the head through the server with each image encoded once, or
``uncached``, whole episodes, with evaluate's reason).

Two servers on one machine share its cores: on a 2-core machine with one single-threaded
instance per model, the fleet can at best double one server's throughput, and the clients'
own data loading competes with them. The figure that carries to a real fleet (a server
per machine) is one server's episodes/s against its clients; the fleet's here shows the
spreading works and what it costs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluate_speed import write_dataset  # noqa: E402

from dmf_export.export import ExportOptions, export_checkpoint  # noqa: E402
from dmf_export.synthetic import write_random_checkpoint  # noqa: E402
from dmf_export.triton import TritonServer  # noqa: E402

MAX_CLIENTS = 64  # as evaluate's --clients


def write_repository(out: Path, threads: int) -> tuple[Path, Path]:
    """(checkpoint, split Triton repository), written once."""
    checkpoint = out / "dmf.pth.tar"
    if not checkpoint.is_file():
        write_random_checkpoint(checkpoint)  # the demo's: seed 0, groups 64, kernel 1
    repo = out / f"dmf.split.threads{threads}.triton"
    if not repo.is_dir():
        export_checkpoint(str(checkpoint), ExportOptions(format="triton", graph="split", output=str(repo),
                                                         threads=threads))
    return checkpoint, repo


def evaluate_command(urls, clients: int, data: Path, episodes: int, protocol: str, extra) -> list[str]:
    command = [sys.executable, "-m", "dmf_export", "evaluate"]
    for url in urls:
        command += ["--server", url]
    return command + ["--protocol", protocol, "--clients", str(clients), "--data", str(data),
                      "--episodes", str(episodes), "--json", *extra]


def run_evaluate(command: list[str], timeout: float) -> dict:
    """evaluate's JSON report (its ``error`` set when it failed mid-run: the episodes
    completed so far), or {'error': its last line} when it printed none."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:g} s (--run-timeout)"}
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        error = lines[-1] if lines else f"exit {result.returncode}"
        try:
            return {**json.loads(result.stdout), "error": error}
        except ValueError:
            return {"error": error}
    return json.loads(result.stdout)


def row(setup: str, clients: int, episodes: int, report: dict) -> dict:
    if "timing" not in report:
        return {"servers": setup, "clients": clients, "episodes": episodes, "error": report["error"]}
    timing, model = report["timing"], report["models"][0]
    cache = model["feature_cache"]
    return {"servers": setup, "clients": clients, "episodes": report["episodes"],
            # which path ran: features encoded once (dmf_encoder + dmf_head) or whole episodes (dmf)
            "path": "cached" if cache.get("used") else "uncached", "uncached_reason": cache.get("reason"),
            "encodes": cache.get("encodes"), "hits": cache.get("hits"),
            "episodes_per_second": timing["episodes_per_second"], "setup_seconds": timing["setup_seconds"],
            "data_wait": timing["data_wait_share"], "accuracy": model["accuracy"],
            "episodes_completed": report["episodes_completed"], "error": report["error"]}


def parse_clients(text: str) -> list[int]:
    counts = [int(c) for c in text.split(",") if c.strip()]
    if not counts or min(counts) < 1 or max(counts) > MAX_CLIENTS:
        raise SystemExit(f"--clients: counts from 1 to {MAX_CLIENTS}, comma-separated (got {text!r})")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--clients", default="1,2,4", help="client counts, comma-separated")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--images", type=int, default=100, help="images per class")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of each model instance")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--run-timeout", type=float, default=1800, help="seconds each evaluate may take")
    parser.add_argument("--evaluate-arg", action="append", default=[], help="passed to every evaluate")
    parser.add_argument("--out", type=Path, default=Path("fleet-bench"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    clients = parse_clients(args.clients)
    args.out.mkdir(parents=True, exist_ok=True)
    data, _ = write_dataset(args.out, args.classes, args.images)
    _, repo = write_repository(args.out, args.threads)
    env_note = os.environ.get("DMF_TRITON_ENV", "this interpreter's environment")
    if not args.json:
        print(f"repository {repo}; server environment {env_note}; {os.cpu_count()} CPUs", flush=True)
    rows = []
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(TritonServer(repo))]
        for setup in ("one server", "two servers"):
            if setup == "two servers":
                servers.append(stack.enter_context(TritonServer(repo)))
            urls = [server.url(args.protocol) for server in servers]
            for count in clients:
                command = evaluate_command(urls, count, data, args.episodes, args.protocol, args.evaluate_arg)
                rows.append(row(setup, count, args.episodes, run_evaluate(command, args.run_timeout)))
                if not args.json:
                    r = rows[-1]
                    figure = (f"{r['path']:<8}  {r['episodes_per_second']:6.3f} episodes/s  "
                              f"setup {r['setup_seconds']:5.1f} s  accuracy {r['accuracy']:.4f}"
                              if "path" in r else "")
                    if r["error"]:
                        figure += f"  FAILED: {r['error']}"
                    print(f"{setup:<12} {count:>2} clients  {r['episodes']:>4} episodes  {figure}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
