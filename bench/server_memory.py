"""Server memory under a burst of large images: peak RSS, and RSS once the load is over.

    python bench/server_memory.py [--clients 16] [--rounds 24] [--max-queued-mb 256]

Starts the local server (pipeline/serve.py, a subprocess) on a resnet18 model with random
weights, then has N clients send, alternately, a 39 KB PNG declaring 39.7 MP (one colour:
160 MB decoded) and a 23 MP PNG (92 MB decoded, within the per-request bounds), and samples
the server's RSS every 50 ms. Prints and writes bench/results/server_memory.json.
Run it on an older checkout (same command) for the figure before a change.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def png(side: int, colour=(9, 9, 9)) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buf, "PNG")
    return buf.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=24, help="requests of each kind")
    p.add_argument("--max-queued-mb", type=float, default=None, help="server flag (default: the server's)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "server_memory.json"))
    args = p.parse_args()

    import psutil

    from pipeline import serve as serve_mod
    from tests._serve_helpers import make_model_dir

    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    options = {} if args.max_queued_mb is None else {"max_queued_mb": args.max_queued_mb}
    endpoint = serve_mod.launch(make_model_dir(tmp / "model"), env={"OMP_NUM_THREADS": "1"},
                                log_path=tmp / "endpoint.log", **options)
    try:
        endpoint.wait_ready(180)
        server = psutil.Process(endpoint.pid)
        idle = server.memory_info().rss
        bomb, big = png(6300), png(4800)
        peak, stop = [idle], threading.Event()

        def watch():
            while not stop.is_set():
                peak[0] = max(peak[0], server.memory_info().rss)
                time.sleep(0.05)

        def post(body: bytes) -> int:
            request = urllib.request.Request(endpoint.url + "/invocations", data=body, method="POST",
                                             headers={"Content-Type": "image/png"})
            try:
                with urllib.request.urlopen(request, timeout=180) as reply:
                    return reply.status
            except urllib.error.HTTPError as err:
                return err.code

        threading.Thread(target=watch, daemon=True).start()
        with ThreadPoolExecutor(args.clients) as pool:
            statuses = list(pool.map(post, [bomb, big] * args.rounds))
        stop.set()
        time.sleep(2)
        after = server.memory_info().rss
        result = {"clients": args.clients, "requests": len(statuses),
                  "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
                  "idle_mb": round(idle / 2**20), "peak_mb": round(peak[0] / 2**20), "after_mb": round(after / 2**20)}
    finally:
        endpoint.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
