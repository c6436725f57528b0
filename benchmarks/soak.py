"""A bounded soak of a served repository: mixed good and bad requests from several clients,
then a killed python-backend stub and a SIGSTOP/SIGCONT of the server.

    python benchmarks/soak.py [--clients 4] [--requests 1000] [--image-size 32]
        [--instances N] [--threads T] [--server-env ENV] [--seed 0] [--json]

A fresh ``export -f triton`` repository (the seeded default checkpoint, groups 64,
kernel 1) is served by the nvidia-pytriton wheel's tritonserver on free loopback ports.
Phase 1: ``--clients`` threads send ``--requests`` requests each, alternating HTTP and
gRPC; about half are good episodes, the rest the bad kinds of ``tests/triton_faults.py``
(wrong shape, rank and dtype, NaN pixels, labels not one-hot, a way beyond the bound,
bodies cut short or longer than their tensors, a 4 GB Content-Length, clients that
vanish mid-request, requests cancelled mid-flight). Every good answer is compared with
an onnxruntime session in this process on the same model.onnx; every bad one with the
error it must get. Phase 2: the stub is killed (requests must fail at once, naming it),
the model reloaded (a new stub), good requests answered. Phase 3: the server is stopped
(SIGSTOP) for 3 s while a request is in flight, then continued: that request and the
next are answered. The server's memory (RSS of the server and its stubs) is sampled
every second. Bounded: a fixed request count, a 30 s timeout per request, a 5 minute
budget after which the phases still running stop. The server and its stubs are stopped
at the end, and the script checks that none of them nor their ports is left.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from triton_faults import (SOAK_FAULTS, good_arrays, reference_scores, scores_match,  # noqa: E402
                           send_fault)
import tritonclient.http as http  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from dmf_export.export import ExportOptions, export_checkpoint  # noqa: E402
from dmf_export.synthetic import write_random_checkpoint  # noqa: E402
from dmf_export.triton import EPISODE_MODEL, TritonRunner, TritonServer, group_members, model_path  # noqa: E402

TIMEOUT = 30.0
BUDGET = 300.0
EPISODES = 8  # distinct good episodes (seeds), their in-process scores computed once


def rss_mb(group: int) -> float:
    """Resident memory of the server's process group (the server and its stubs), MB."""
    total = 0
    for pid, _name in group_members(group):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class Sampler(threading.Thread):
    def __init__(self, group: int):
        super().__init__(daemon=True)
        self.group, self.samples, self.stopped = group, [], threading.Event()

    def run(self):
        start = time.monotonic()
        while not self.stopped.is_set():
            self.samples.append((time.monotonic() - start, rss_mb(self.group)))
            self.stopped.wait(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=1000, help="requests per client in phase 1")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--instances", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--server-env", help="environment with nvidia-pytriton (default $DMF_TRITON_ENV)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    deadline = time.monotonic() + BUDGET
    image = args.image_size
    counts = collections.Counter()
    surprises: list[str] = []
    lock = threading.Lock()

    def count(key, detail=None):
        with lock:
            counts[key] += 1
            if detail:
                surprises.append(detail)

    with tempfile.TemporaryDirectory(prefix="dmf-soak-") as scratch:
        scratch = Path(scratch)
        checkpoint = write_random_checkpoint(scratch / "dmf.pth.tar", groups=64, kernel=1, seed=0)
        extra = {k: v for k, v in (("instances", args.instances), ("threads", args.threads)) if v}
        export_checkpoint(str(checkpoint), ExportOptions(format="triton", output=str(scratch / "repo"),
                                                         image_size=image, **extra))
        session = ort.InferenceSession(str(model_path(scratch / "repo")), providers=["CPUExecutionProvider"])
        goods = [good_arrays(image, seed) for seed in range(EPISODES)]
        references = [reference_scores(session, g) for g in goods]

        server = TritonServer(scratch / "repo", server_env=args.server_env, models=[EPISODE_MODEL],
                              exit_timeout=3).start()
        group, server_pid = server.process.pid, server.process.pid
        ports = list(server.ports.values())
        stubs_at_start = set(server.stub_pids())
        sampler = Sampler(group)
        sampler.start()

        def good_request(runner, k, label):
            try:
                scores = runner.infer(goods[k])[0]
            except InferenceServerException as err:
                count("good: error", f"{label}: good request got {err.message()}")
                return
            if scores_match(scores, references[k]):
                count("good: right scores")
            else:
                count("good: WRONG scores", f"{label}: scores differ from in-process")

        def client(index):
            rng = random.Random(args.seed * 1000 + index)
            runners = {p: TritonRunner(server, EPISODE_MODEL, protocol=p, timeout=TIMEOUT) for p in ("http", "grpc")}
            try:
                for i in range(args.requests):
                    if time.monotonic() > deadline:
                        count("not sent (budget)")
                        continue
                    protocol = ("http", "grpc")[(index + i) % 2]
                    k = rng.randrange(EPISODES)
                    if rng.random() < 0.5:
                        count("good: sent")
                        good_request(runners[protocol], k, protocol)
                        continue
                    fault = rng.choice([f for f in SOAK_FAULTS if protocol in f.protocols])
                    count("bad: sent")
                    try:
                        ok, outcome = send_fault(fault, protocol, runners[protocol], server.url(protocol),
                                                 goods[k], image, TIMEOUT)
                    except Exception as err:  # noqa: BLE001 (a client-side failure is a finding too)
                        ok, outcome = False, f"{type(err).__name__}: {err}"
                    if ok:
                        count("bad: error as expected")
                    else:
                        count("bad: UNEXPECTED", f"{protocol} {fault.name}: {outcome[:300]}")
            finally:
                for r in runners.values():
                    r.close()

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        phase1 = time.monotonic() - started

        # phase 2: a killed stub, then a reload
        runner = TritonRunner(server, EPISODE_MODEL, protocol="grpc", timeout=TIMEOUT)
        for stub in server.stub_pids():
            os.kill(stub, signal.SIGKILL)
        count("stubs killed on purpose")
        t0 = time.monotonic()
        try:
            runner.infer(goods[0])
            count("after the kill: answered (unexpected)", "a request after the stub's kill was answered")
        except InferenceServerException as err:
            count("after the kill: refused" if "not healthy" in err.message() else "after the kill: other error",
                  None if "not healthy" in err.message() else err.message())
        kill_refusal_s = time.monotonic() - t0
        control = http.InferenceServerClient(server.url("http"))
        control.unload_model(EPISODE_MODEL)
        while control.is_model_ready(EPISODE_MODEL) and time.monotonic() < deadline + 60:
            time.sleep(0.1)
        control.load_model(EPISODE_MODEL)
        control.close()
        for k in range(EPISODES):
            count("good: sent")
            good_request(runner, k, "after reload")

        # phase 3: SIGSTOP/SIGCONT of the server with a request in flight
        result = {}

        def in_flight():
            r = TritonRunner(server, EPISODE_MODEL, protocol="http", timeout=TIMEOUT)
            try:
                t = time.monotonic()
                result["scores"] = r.infer(goods[1])[0]
                result["seconds"] = time.monotonic() - t
            except Exception as err:  # noqa: BLE001
                result["error"] = str(err)
            finally:
                r.close()

        os.kill(server_pid, signal.SIGSTOP)
        flight = threading.Thread(target=in_flight)
        flight.start()
        time.sleep(3)
        os.kill(server_pid, signal.SIGCONT)
        flight.join(TIMEOUT + 5)
        count("good: sent")
        if "scores" in result and scores_match(result["scores"], references[1]):
            count("good: right scores")
            count("answered across SIGSTOP/SIGCONT")
        else:
            count("good: error", f"across SIGSTOP: {result}")
        for k in range(EPISODES):
            count("good: sent")
            good_request(runner, k, "after SIGCONT")
        runner.close()

        restarts = int(server.process.poll() is not None or server.process.pid != server_pid)
        stubs_now = set(server.stub_pids())
        sampler.stopped.set()
        sampler.join()
        server.stop()
        left = [pid for pid, _ in group_members(group)]
        busy = []
        for port in ports:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    busy.append(port)

    samples = sampler.samples
    report = {
        "machine": {"cores": os.cpu_count(), "load": os.getloadavg()},
        "clients": args.clients, "requests_per_client": args.requests, "image_size": image,
        "phase1_seconds": round(phase1, 1), "counts": dict(sorted(counts.items())),
        "wrong_answers": counts["good: WRONG scores"],
        "server_restarts": restarts, "stubs_replaced": len(stubs_at_start - stubs_now),
        "kill_refused_in_s": round(kill_refusal_s, 3), "across_sigstop_s": round(result.get("seconds", -1), 2),
        "rss_mb": {"start": round(samples[0][1], 1), "after_phase1": None, "max": round(max(s for _, s in samples), 1),
                   "end": round(samples[-1][1], 1)},
        "left_behind": {"processes": left, "ports": busy}, "surprises": surprises[:30],
    }
    after = [s for t, s in samples if t <= phase1]
    report["rss_mb"]["after_phase1"] = round(after[-1], 1) if after else None
    # growth without bound would show as a rise from the first quarter of phase 1 to its end
    quarter = [s for t, s in samples if t <= phase1 / 4]
    report["rss_mb"]["phase1_first_quarter"] = round(quarter[-1], 1) if quarter else None
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    failed = (counts["good: WRONG scores"] or counts["bad: UNEXPECTED"] or counts["good: error"]
              or restarts or left or busy)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
