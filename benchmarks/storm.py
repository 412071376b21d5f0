"""A reconnect storm: N clients connecting at the same moment, as after a restart.

    python benchmarks/storm.py --clients 10000 --processes 20

Starts a server, then `--processes` load generators at once, each opening its share of
subscribed connections as fast as the server answers. Prints how long until every one
of them was welcomed and subscribed, and the resulting connects per second.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from lib import build_loadgen, free_port, start_fastfan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=20)
    parser.add_argument("--workers", default="1")
    args = parser.parse_args()
    loadgen = build_loadgen()
    port = free_port()
    server = start_fastfan(port, ["--workers", args.workers], pin=False)
    share = args.clients // args.processes
    try:
        started = time.monotonic()
        storm = [subprocess.Popen(
            [str(loadgen), "--port", str(port), "--subs", str(share), "--rate", "0", "--sync",
             "1", "--channel", "storm", "--duration", "0", "--drain", "0",
             "--sources", f"127.0.0.{2 + k % 200}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for k in range(args.processes)]
        for process in storm:
            assert process.stdout is not None
            json.loads(process.stdout.readline())
        elapsed = time.monotonic() - started
        for process in storm:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
            process.wait(60)
    finally:
        server.terminate()
        server.wait(30)
    total = share * args.processes
    print(json.dumps({"clients": total, "processes": args.processes, "workers": args.workers,
                      "all_served_s": round(elapsed, 2),
                      "connects_per_s": round(total / elapsed)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
