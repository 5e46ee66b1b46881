#!/usr/bin/env python3
"""The Python SDK's overhead over the Rust API, same run, same connection.

The agent runs as a host process on a Unix socket (``msb-init agent --listen``), so the
figures are the SDK's own cost at full speed, not a VM's. Rounds alternate between Python
(``sb.run(["true"])`` through the installed wheel) and the Rust API (the same loop inside the
native module, over the same connection), so a slow spell of a shared machine falls on both.
Stdout throughput compares like with like: ``sb.stream`` against the Rust event loop (output
dropped as it comes), ``sb.run`` against ``ExecHandle::output`` (output kept: its memory is
part of the cost).

    python bench_sdk.py [--iterations 2000] [--rounds 10] [--bytes 268435456] [--runs 3]

Prints p50/p90/p99 of each and the ratio of the medians; ``--json FILE`` keeps the samples.
Target (issue 20): the Python layer adds at most 10 % to the round trip."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import msb_vmm
from msb_vmm import Sandbox, Stdout


def pct(xs, p):
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(p / 100.0 * (len(xs) - 1)))))
    return xs[i]


def summary(xs):
    return {"n": len(xs), "p50": pct(xs, 50), "p90": pct(xs, 90), "p99": pct(xs, 99)}


def msb_init_path(given):
    if given:
        return given
    if os.environ.get("MSB_INIT"):
        return os.environ["MSB_INIT"]
    cache = os.environ.get("MSB_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "msb-vmm"
    )
    return os.path.join(cache, "msb-init")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=2000, help="round trips of `true` per side")
    ap.add_argument("--rounds", type=int, default=10, help="turns each side takes")
    ap.add_argument("--bytes", type=int, default=256 << 20, help="stdout bytes per throughput run")
    ap.add_argument("--runs", type=int, default=3, help="throughput runs per side")
    ap.add_argument("--msb-init", help="the static msb-init (default: the one ./x setup cached)")
    ap.add_argument("--json", help="write samples and summaries here")
    a = ap.parse_args()
    init = msb_init_path(a.msb_init)
    if not os.access(init, os.X_OK):
        sys.exit("bench_sdk: no msb-init at %s: run ./x setup (or pass --msb-init)" % init)
    d = tempfile.mkdtemp(prefix="msb-py-bench-")
    sock = os.path.join(d, "agent.sock")
    agent = subprocess.Popen([init, "agent", "--listen", sock])
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if time.monotonic() > deadline or agent.poll() is not None:
                sys.exit("bench_sdk: the host agent did not start")
            time.sleep(0.002)
        sb = Sandbox._from_agent_socket(sock)
        native = sb._native
        for _ in range(20):
            sb.run(["true"])
        native._rust_round_trips(20)
        py_rt, rust_rt = [], []
        rounds = max(1, a.rounds)
        for r in range(rounds):
            share = a.iterations // rounds + (1 if r < a.iterations % rounds else 0)
            for _ in range(share):
                t = time.perf_counter()
                res = sb.run(["true"])
                py_rt.append((time.perf_counter() - t) * 1000.0)
                if res.exit_code != 0:
                    sys.exit("bench_sdk: `true` failed: %r" % (res,))
            rust_rt.extend(native._rust_round_trips(share))
        py_run_tp, py_stream_tp, rust_tp, rust_out_tp = [], [], [], []
        cmd = ["head", "-c", str(a.bytes), "/dev/zero"]
        for _ in range(a.runs):
            t = time.perf_counter()
            res = sb.run(cmd)
            py_run_tp.append(a.bytes / (time.perf_counter() - t) / 1e6)
            assert len(res.stdout) == a.bytes, len(res.stdout)
            t = time.perf_counter()
            got = 0
            for ev in sb.stream(cmd):
                if isinstance(ev, Stdout):
                    got += len(ev.data)
            py_stream_tp.append(a.bytes / (time.perf_counter() - t) / 1e6)
            assert got == a.bytes, got
            rust_tp.append(native._rust_throughput(a.bytes))
            rust_out_tp.append(native._rust_throughput(a.bytes, True))
        sb.close()
    finally:
        agent.kill()
        agent.wait()
        try:
            os.unlink(sock)
            os.rmdir(d)
        except OSError:
            pass
    res = {
        "msb_vmm": msb_vmm.__version__,
        "python": sys.version.split()[0],
        "round_trip_ms": {"python": summary(py_rt), "rust": summary(rust_rt)},
        "throughput_mb_s": {
            "python stream": summary(py_stream_tp),
            "rust events": summary(rust_tp),
            "python run": summary(py_run_tp),
            "rust output()": summary(rust_out_tp),
        },
        "samples": {"python_rt": py_rt, "rust_rt": rust_rt, "python_run_tp": py_run_tp,
                    "python_stream_tp": py_stream_tp, "rust_tp": rust_tp,
                    "rust_output_tp": rust_out_tp},
    }
    print("agent over a Unix socket: %d round trips per side in %d alternating rounds, %d x %d bytes"
          % (a.iterations, rounds, a.runs, a.bytes))
    print("%-34s %10s %10s %10s" % ("", "p50", "p90", "p99"))
    for name, s in (("round trip, Python sb.run (ms)", res["round_trip_ms"]["python"]),
                    ("round trip, Rust API (ms)", res["round_trip_ms"]["rust"])):
        print("%-34s %10.4f %10.4f %10.4f" % (name, s["p50"], s["p90"], s["p99"]))
    for name, s in res["throughput_mb_s"].items():
        print("%-34s %10.0f %10.0f %10.0f" % ("stdout, %s (MB/s)" % name, s["p50"], s["p90"], s["p99"]))
    ratio = res["round_trip_ms"]["python"]["p50"] / res["round_trip_ms"]["rust"]["p50"]
    res["round_trip_ratio_p50"] = ratio
    print("Python / Rust round trip, p50: %.3f (target <= 1.10)" % ratio)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
