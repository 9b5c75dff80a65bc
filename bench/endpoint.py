"""Endpoint benchmark: the raw forward pass, our local server and SageMaker's own serving
stack (sagemaker-pytorch-inference + TorchServe), side by side in one run.

    python bench/endpoint.py                  # the comparison: bench/results/endpoint.json + .md
    python bench/endpoint.py --knobs          # the stack's knobs: bench/results/endpoint_knobs.json + .md

Measured, on one machine in one run, interleaved round-robin so that the load of a
shared machine (it changes by the second) weighs on every variant alike:
  raw forward      the network alone in this process, batch 1: torch eager (today's
                   torch path) and model.onnx under ONNX Runtime (the fast path)
  local server     pipeline/serve.py serving the deployed model.tar.gz
  stack, today     the real serving stack with SageMaker's defaults (one TorchServe
                   worker per CPU, no OMP_NUM_THREADS) serving today's archive: model.pth
  stack, deployed  the real serving stack with the Model step's Environment
                   (steps/model.py serving_env for the endpoint instance type) serving the
                   archive train_model.py writes now: model.pth + the validated model.onnx
Each server: p50/p99 at one client, throughput at 1 and N clients, RSS of its whole
process tree (TorchServe: Java frontend + Python workers). Answers: every server's
top-1 on natural-ish generated photos (smooth colour fields with shapes), and on real
photographs with --real-photos, must equal torch's. Requests are 500x375 JPEGs over
keep-alive HTTP.
ResNet50 with random weights (speed does not depend on them), 133 classes, 224 px.

Real photographs, offline: scikit-image's wheel carries a dozen (a cat, an astronaut, coffee,
a rocket, motorcycles, the moon...), and pip reaches PyPI:
    pip download --no-deps scikit-image==0.26.0 -d /tmp/skimage
    python bench/endpoint.py --real-photos /tmp/skimage/scikit_image-0.26.0-*.whl
A directory of JPEG/PNG files works too.

--knobs runs the stack serving the deployed archive under several Environments
(TorchServe workers x OMP threads per worker, core sharing between the workers,
TorchServe batching) the same way.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import re
import statistics
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

# On a shared, oversubscribed machine OpenMP's default spin-waiting makes one
# process's idle threads burn the CPU another is timing on: figures swung 5x with
# it. Passive waiting everywhere (inherited by every server; ONNX Runtime's
# spinning follows it in modeling.OnnxNet): the same setting for all variants.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import export  # noqa: E402  scripts/export.py, as train_model.py runs it
import model_dir  # noqa: E402  scripts/model_dir.py: the model dir as training writes it
import modeling  # noqa: E402
import train_lib  # noqa: E402
from pipeline import serve  # noqa: E402
from pipeline.files import atomic_write  # noqa: E402
from pipeline.runtime import serving  # noqa: E402
from pipeline.sample_data import DOG_CLASS_DIRS  # noqa: E402
from steps.model import serving_env  # noqa: E402

INSTANCE_TYPE = "ml.m5.large"  # what pipeline.yaml deploys to: 2 vCPUs


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1000, q))


def natural_photo(seed: int, size=(500, 375)) -> Image.Image:
    """Photo-like content: a smooth colour field, soft shapes, mild sensor noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    draw = ImageDraw.Draw(coarse)
    for _ in range(6):
        x, y = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
        r = int(rng.integers(20, 120))
        draw.ellipse((x - r, y - r // 2, x + r, y + r // 2), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    image = coarse.filter(ImageFilter.GaussianBlur(3))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# scikit-image's sample images that are photographs (the rest are drawings, text, patterns)
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
                  "hubble_deep_field", "moon", "motorcycle_left", "motorcycle_right", "retina", "rocket")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def real_photos(path: Path) -> dict[str, bytes]:
    """name -> JPEG bytes (RGB, quality 90, as a client would send them) of the photographs in a
    directory of JPEG/PNG files, or in a scikit-image wheel (skimage/data/<SKIMAGE_PHOTOS>)."""
    if path.is_dir():
        files = {f.stem: f.read_bytes() for f in sorted(path.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES}
    else:
        with zipfile.ZipFile(path) as wheel:
            files = {Path(n).stem: wheel.read(n) for n in sorted(wheel.namelist())
                     if n.startswith("skimage/data/") and Path(n).suffix.lower() in IMAGE_SUFFIXES
                     and Path(n).stem in SKIMAGE_PHOTOS}
    if not files:
        raise ValueError(f"{path}: no photographs (JPEG/PNG files, or a scikit-image wheel)")
    return {name: jpeg(Image.open(io.BytesIO(raw)).convert("RGB")) for name, raw in files.items()}


def make_model_dir(path: Path, arch: str, image_size: int, requirements: str) -> Path:
    """A model dir of random weights, written by scripts/model_dir.py as training writes it."""
    resize, crop = modeling.eval_geometry(arch, "imagenet", image_size=image_size)
    torch.manual_seed(0)
    model = modeling.build_model(arch, len(DOG_CLASS_DIRS), weights="none")
    return model_dir.write_model_dir(path, model.state_dict(), model_dir.model_meta(arch, DOG_CLASS_DIRS, crop, resize),
                                     requirements=requirements)


def make_tarball(model_dir: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz", compresslevel=1) as tar:
        for item in sorted(model_dir.iterdir()):
            tar.add(item, arcname=item.name)
    return dest


def build_archives(tmp: Path, arch: str, image_size: int, photos: list[Path]) -> dict:
    """today: model.pth only (main's requirements-inference.txt had no packages);
    deployed: the same weights + model.onnx exported and validated by scripts/export.py."""
    today = make_model_dir(tmp / "today", arch, image_size, "# no packages: torch from the image\n")
    deployed = make_model_dir(tmp / "deployed", arch, image_size,
                              (ROOT / "scripts" / model_dir.INFERENCE_REQUIREMENTS).read_text())
    entry = export.export_model_dir(deployed, photos, train_lib.load_image)
    print(f"export: {entry['bytes'] / 1e6:.0f} MB, validated on {entry['validated']['images']} photos, "
          f"max probability difference {entry['validated']['max_prob_diff']:.1e}", flush=True)
    return {"today": make_tarball(today, tmp / "today.tar.gz"),
            "deployed": make_tarball(deployed, tmp / "deployed.tar.gz"),
            "deployed_dir": deployed, "today_dir": today, "onnx": entry}


class RawForward:
    """The served network's forward pass in this process (input preprocessed), as model_fn builds it."""

    def __init__(self, model_dir: Path, body: bytes, runtime: str):
        os.environ["INFERENCE_RUNTIME"] = runtime
        try:
            handlers = serve.Handlers(model_dir, "inference.py")
            handlers.load()
        finally:
            del os.environ["INFERENCE_RUNTIME"]
        self.handlers, self.model = handlers, handlers.model
        image = handlers.input(body, "image/jpeg")["images"][0]
        self.x = self.model["transform"](image)[None]
        if self.model["runtime"] == "torch":
            self.x = self.x.to(self.model["device"], memory_format=torch.channels_last)
        self.time(3)  # warm-up

    def time(self, iters: int) -> list[float]:
        times = []
        with torch.inference_mode():
            for _ in range(iters):
                start = time.perf_counter()
                self.model["net"](self.x)
                times.append(time.perf_counter() - start)
        return times

    def top1(self, body: bytes) -> int:
        prediction = self.handlers.predict(self.handlers.input(body, "image/jpeg"))
        return int(prediction["probabilities"][0].argmax())


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    """One request; a keep-alive connection the server closed while idle (uvicorn: after 5 s,
    e.g. while the other servers had their turn) is reopened once (loopback: ~0.1 ms)."""
    for attempt in (1, 2):
        try:
            conn.request("POST", "/invocations", body, {"Content-Type": "image/jpeg", "Accept": "application/json"})
            reply = conn.getresponse()
            return reply.status, reply.read()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            conn.close()
            if attempt == 2:
                raise


def connect(url: str) -> http.client.HTTPConnection:
    target = urlparse(url)
    return http.client.HTTPConnection(target.hostname, target.port, timeout=120)


def run_clients(url: str, body: bytes, clients: int, per_client: int) -> dict:
    latencies, errors = [], []
    lock, barrier = threading.Lock(), threading.Barrier(clients)

    def client():
        conn = connect(url)
        barrier.wait()
        for _ in range(per_client):
            start = time.perf_counter()
            status, answer = post(conn, body)
            elapsed = time.perf_counter() - start
            with lock:
                if status != 200:
                    errors.append(answer[:200])
                latencies.append(elapsed)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "errors": len(errors), "wall": time.perf_counter() - start,
            "error_sample": errors[:1]}


def summarise(runs: list[dict], clients: int) -> dict:
    latencies = [x for r in runs for x in r["latencies"]]
    per_round = [len(r["latencies"]) / r["wall"] for r in runs]
    cpu_ms = 1000 * sum(r.get("cpu_s", 0.0) for r in runs) / len(latencies)
    return {"p50_ms_per_round": [percentile(r["latencies"], 50) for r in runs],
            "throughput_rps_per_round": per_round,"cpu_ms_per_request": cpu_ms,
            # a server that has the whole machine to itself, all cores busy: cores / CPU cost
            "throughput_rps_if_cpu_bound_on_all_cores": (os.cpu_count() or 1) * 1000 / cpu_ms if cpu_ms else None,
            "clients": clients, "requests": len(latencies), "errors": sum(r["errors"] for r in runs),
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "min_ms": min(latencies) * 1000,
            "throughput_rps": len(latencies) / sum(r["wall"] for r in runs),
            "throughput_rps_best_round": max(per_round), "throughput_rps_median_round": statistics.median(per_round)}


def group_rss_mb(pgid: int) -> float:
    """Resident memory of a server's whole process group (TorchServe: the toolkit's python,
    Java and every worker; Java is not the launcher's child, so the group, not the tree)."""
    total = 0
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid:
                total += process.memory_info().rss
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            pass
    return total / 2**20


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by a server's process group: what a request
    costs, independent of how much of a shared machine the server got meanwhile."""
    total = 0.0
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid:
                times = process.cpu_times()
                total += times.user + times.system
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            pass
    return total


def measure(servers: dict, raws: dict, body: bytes, rounds: int, per_round: int, clients: int,
            burst: int = 3) -> dict:
    """Round-robin: in each round, one request to each server (and one raw forward of
    each kind) in turn, per_round times; then the N-client burst (`burst` requests per client)
    on each server in turn."""
    singles = {name: [] for name in servers}
    bursts = {name: [] for name in servers}
    raw_times = {name: [] for name in raws}
    conns = {name: connect(s.url) for name, s in servers.items()}
    for name, s in servers.items():  # warm-up: connection path, worker start-up effects
        for _ in range(3):
            post(conns[name], body)
        run_clients(s.url, body, clients, 1)
    for r in range(rounds):
        print(f"round {r + 1}/{rounds}", flush=True)
        laps = {name: {"latencies": [], "errors": 0, "wall": 0.0} for name in servers}
        cpu_before = {name: group_cpu_s(s.pid) for name, s in servers.items()}
        for _ in range(per_round):
            for name, raw in raws.items():
                raw_times[name] += raw.time(1)
            for name in servers:
                start = time.perf_counter()
                status, _ = post(conns[name], body)
                elapsed = time.perf_counter() - start
                laps[name]["latencies"].append(elapsed)
                laps[name]["wall"] += elapsed
                laps[name]["errors"] += status != 200
        for name, s in servers.items():
            laps[name]["cpu_s"] = group_cpu_s(s.pid) - cpu_before[name]
            singles[name].append(laps[name])
        for name, s in servers.items():
            cpu = group_cpu_s(s.pid)
            bursts[name].append(run_clients(s.url, body, clients, burst))
            bursts[name][-1]["cpu_s"] = group_cpu_s(s.pid) - cpu
    for conn in conns.values():
        conn.close()
    out = {"raw_forward": {name: {"p50_ms": percentile(t, 50), "p99_ms": percentile(t, 99), "min_ms": min(t) * 1000}
                           for name, t in raw_times.items()}, "servers": {}}
    for name, s in servers.items():
        out["servers"][name] = {"one_client": summarise(singles[name], 1),
                                f"{clients}_clients": summarise(bursts[name], clients),
                                "rss_mb": round(group_rss_mb(s.pid), 1)}
    return out


def top1_answers(url: str, bodies: list[bytes]) -> list[int]:
    conn = connect(url)
    out = []
    for body in bodies:
        status, answer = post(conn, body)
        out.append(json.loads(answer)["top"][0]["index"] if status == 200 else -1)
    conn.close()
    return out


def start_servers(specs: dict, log_dir: Path) -> dict:
    """name -> (kind, archive, env); each started once the one before is ready: the free ports
    launch() picks are free when picked, and a neighbour starting at the same time can take one."""
    started = {}
    try:
        for name, (kind, archive, env) in specs.items():
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")  # TorchServe splits model paths on ","
            log = log_dir / f"{slug}.log"
            if kind == "local":
                started[name] = serve.launch(archive, log_path=log, env=env, threads=2, max_batch_size=8,
                                             max_batch_delay_ms=5.0)
            else:
                started[name] = serving.launch(archive, env=env, log_path=log, workdir=log_dir / slug)
            started[name].wait_ready(300)
            print(f"ready: {name} at {started[name].url}", flush=True)
    except BaseException:
        stop_all(started)
        raise
    return started


def model_fn_lines(servers: dict) -> dict:
    """What each server's model_fn said it loads (runtime, threads), from its log."""
    out = {}
    for name, s in servers.items():
        try:
            text = Path(s.log_path).read_text(errors="replace")
        except OSError:
            continue
        out[name] = sorted({line.split("model_fn:", 1)[1].strip().split(": ", 1)[-1]
                            for line in text.splitlines() if "model_fn:" in line})
    return out


def stop_all(servers: dict) -> None:
    for s in servers.values():
        try:
            s.stop()
        except Exception as err:  # noqa: BLE001 - keep stopping the others
            print(f"warning: stopping a server: {err}", file=sys.stderr)


def machine_info(load_before) -> dict:
    return {"platform": platform.platform(), "processor": cpu_model(), "cpus": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "note": "shared 2-core machine (six engineers): absolute times are noisy, ratios come from "
                    "interleaved rounds of the same run"}


def versions() -> dict:
    import onnxruntime
    return {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "toolkits": list(__import__("pipeline.runtime.toolkits", fromlist=["PACKAGES"]).PACKAGES)}


def write(result: dict, out: Path, markdown: str) -> None:
    atomic_write(out, json.dumps(result, indent=2) + "\n")
    atomic_write(out.with_suffix(".md"), markdown)
    print(markdown)
    print(f"wrote {out} and {out.with_suffix('.md').name}")


def server_table(measured: dict, clients: int, envs: dict) -> list[str]:
    rows = ["| variant | Environment | p50 (ms) | p99 (ms) | 1 client (req/s) | "
            f"{clients} clients (req/s) | CPU ms / request at {clients} clients | RSS (MB) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, raw in measured["raw_forward"].items():
        rows.append(f"| raw forward, {name} | in process | {raw['p50_ms']:.1f} | {raw['p99_ms']:.1f} | | | | |")
    for name, m in measured["servers"].items():
        one, many = m["one_client"], m[f"{clients}_clients"]
        shown = {k: v for k, v in envs.get(name, {}).items()
                 if k.startswith(("SAGEMAKER_MODEL_SERVER", "SAGEMAKER_TS", "OMP"))}
        env = ", ".join(f"{k}={v}" for k, v in shown.items()) or "-"
        rows.append(f"| {name} | {env} | {one['p50_ms']:.1f} | {one['p99_ms']:.1f} | {one['throughput_rps']:.2f} | "
                    f"{many['throughput_rps']:.2f} | {many['cpu_ms_per_request']:.0f} | {m['rss_mb']:.0f} |")
    return rows


def compare(args, tmp: Path, archives: dict, body: bytes, photos: list[bytes], real: dict[str, bytes]) -> int:
    deployed_env = serving_env(INSTANCE_TYPE)
    # SageMaker's defaults: TorchServe starts one worker per CPU when the Environment names
    # none; launch() always passes SAGEMAKER_MODEL_SERVER_WORKERS, so pass that very default.
    default_env = {"SAGEMAKER_MODEL_SERVER_WORKERS": str(os.cpu_count())}
    specs = {"local server (deployed archive)": ("local", archives["deployed"], {}),
             "stack, today (defaults, model.pth)": ("stack", archives["today"], default_env),
             "stack, deployed (Environment + model.onnx)": ("stack", archives["deployed"], deployed_env)}
    servers = start_servers(specs, tmp)
    try:
        raws = {"torch (today)": RawForward(archives["today_dir"], body, "torch"),
                "ONNX Runtime (fast path)": RawForward(archives["deployed_dir"], body, "onnx")}
        measured = measure(servers, raws, body, args.rounds, args.per_round, args.clients)
        reference = [raws["torch (today)"].top1(p) for p in photos]
        answers = {name: top1_answers(s.url, photos) for name, s in servers.items()}
        real_reference = [raws["torch (today)"].top1(p) for p in real.values()]
        real_answers = {name: top1_answers(s.url, list(real.values())) for name, s in servers.items()}
        loaded = model_fn_lines(servers)
    finally:
        stop_all(servers)
    local, today, deployed = (measured["servers"][n] for n in specs)
    many = f"{args.clients}_clients"
    p50_ratio = deployed["one_client"]["p50_ms"] / today["one_client"]["p50_ms"]
    tput_ratio = deployed[many]["throughput_rps"] / today[many]["throughput_rps"]
    local_p50 = local["one_client"]["p50_ms"] / deployed["one_client"]["p50_ms"]
    local_tput = local[many]["throughput_rps"] / deployed[many]["throughput_rps"]
    round_p50 = [d / t for d, t in zip(deployed["one_client"]["p50_ms_per_round"],
                                       today["one_client"]["p50_ms_per_round"])]
    round_tput = [d / t for d, t in zip(deployed[many]["throughput_rps_per_round"],
                                        today[many]["throughput_rps_per_round"])]
    agree = {name: sum(a == b for a, b in zip(ans, reference)) for name, ans in answers.items()}
    real_agree = {name: sum(a == b for a, b in zip(ans, real_reference)) for name, ans in real_answers.items()}
    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.load_before), "versions": versions(),
        "settings": {"arch": args.arch, "image_size": args.image_size, "classes": len(DOG_CLASS_DIRS),
                     "request": f"500x375 JPEG ({len(body)} bytes), image/jpeg, keep-alive",
                     "rounds": args.rounds, "per_round": args.per_round, "clients": args.clients,
                     "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"], "instance_type_env": INSTANCE_TYPE,
                     "environments": {n: s[2] for n, s in specs.items()},
                     "local_server": "threads 2, max batch 8, max delay 5 ms", "onnx_export": archives["onnx"]},
        **measured, "model_fn": loaded,
        "answers": {"photos": len(photos), "kind": "generated natural-ish photos",
                    "top1_equal_to_torch": agree,
                    "real_photos": {"source": Path(args.real_photos).name, "names": list(real),
                                    "top1_equal_to_torch": real_agree} if real else None},
        "targets": {
            "stack_deployed_p50_over_today": {"value": round(p50_ratio, 3), "target": "<= 0.70",
                                              "met": p50_ratio <= 0.70,
                                              "per_round_median": round(statistics.median(round_p50), 3),
                                              "per_round_best": round(min(round_p50), 3)},
            f"stack_deployed_{args.clients}_client_throughput_over_today": {
                "value": round(tput_ratio, 3), "target": ">= 1.4", "met": tput_ratio >= 1.4,
                "per_round_median": round(statistics.median(round_tput), 3),
                "per_round_best": round(max(round_tput), 3)},
            f"stack_today_over_deployed_cpu_per_request_at_{args.clients}_clients": {
                "value": round(today[many]["cpu_ms_per_request"] / deployed[many]["cpu_ms_per_request"], 3),
                "target": ">= 1.4 (supporting: the throughput a dedicated host would get)",
                "met": today[many]["cpu_ms_per_request"] >= 1.4 * deployed[many]["cpu_ms_per_request"]},
            "local_server_p50_over_stack_deployed": {"value": round(local_p50, 3), "target": "<= 1.0",
                                                     "met": local_p50 <= 1.0},
            f"local_server_{args.clients}_client_throughput_over_stack_deployed": {
                "value": round(local_tput, 3), "target": ">= 1.0", "met": local_tput >= 1.0},
            # the earlier local-server targets (issue 3), kept comparable
            "local_server_p50_over_raw_forward_fast_path": {
                "value": round(local["one_client"]["p50_ms"]
                               / measured["raw_forward"]["ONNX Runtime (fast path)"]["p50_ms"], 3),
                "target": "<= 1.10", "met": local["one_client"]["p50_ms"]
                <= 1.10 * measured["raw_forward"]["ONNX Runtime (fast path)"]["p50_ms"]},
            f"local_server_{args.clients}_over_1_client_throughput": {
                "value": round(local[many]["throughput_rps"] / local["one_client"]["throughput_rps"], 3),
                "target": ">= 1.5",
                "met": local[many]["throughput_rps"] >= 1.5 * local["one_client"]["throughput_rps"]},
            "same_top1_on_photos": {"value": agree, "target": f"{len(photos)} each",
                                    "met": all(v == len(photos) for v in agree.values())},
            **({"same_top1_on_real_photos": {"value": real_agree, "target": f"{len(real)} each",
                                             "met": all(v == len(real) for v in real_agree.values())}}
               if real else {}),
        },
    }
    lines = [f"Endpoint benchmark, {result['when']}: {args.arch} {args.image_size}px {len(DOG_CLASS_DIRS)} classes, "
             f"{os.cpu_count()} CPUs ({cpu_model()}), load {result['machine']['load_average_before'][0]} -> "
             f"{result['machine']['load_average_after'][0]}; {args.rounds} interleaved rounds.", "",
             *server_table(measured, args.clients, result["settings"]["environments"]), "",
             "| target | value | met |", "|---|---|---|"]
    for name, t in result["targets"].items():
        rounds = (f" (per round: median {t['per_round_median']}, best {t['per_round_best']})"
                  if "per_round_best" in t else "")
        lines.append(f"| {name} {t['target']} | {t['value']}{rounds} | {'yes' if t['met'] else 'no'} |")
    write(result, Path(args.out), "\n".join(lines) + "\n")
    return 0


KNOBS = {  # name -> Environment over serving_env's base (steps/model.py); None removes a key
    "1 worker x 2 threads": {"SAGEMAKER_MODEL_SERVER_WORKERS": "1", "OMP_NUM_THREADS": "2"},
    "2 workers x 1 thread": {"SAGEMAKER_MODEL_SERVER_WORKERS": "2", "OMP_NUM_THREADS": "1"},
    "2 workers x 2 threads, no core sharing": {"SAGEMAKER_MODEL_SERVER_WORKERS": "2", "OMP_NUM_THREADS": "2",
                                               "INFERENCE_SHARE_CORES": "0"},
    "2 workers x 2 threads, cores shared (inference.py CoreShare)": {"SAGEMAKER_MODEL_SERVER_WORKERS": "2",
                                                                     "OMP_NUM_THREADS": "2"},
    "1 worker x 2 threads, TS batch 8 / 5 ms": {"SAGEMAKER_MODEL_SERVER_WORKERS": "1", "OMP_NUM_THREADS": "2",
                                                "SAGEMAKER_TS_BATCH_SIZE": "8", "SAGEMAKER_TS_MAX_BATCH_DELAY": "5"},
}


def knobs(args, tmp: Path, archives: dict, body: bytes) -> int:
    base = {k: v for k, v in serving_env(INSTANCE_TYPE).items()
            if k not in ("SAGEMAKER_MODEL_SERVER_WORKERS", "OMP_NUM_THREADS")}
    specs = {"today: defaults, model.pth": ("stack", archives["today"],
                                            {"SAGEMAKER_MODEL_SERVER_WORKERS": str(os.cpu_count())})}
    specs.update({name: ("stack", archives["deployed"], {**base, **env}) for name, env in KNOBS.items()})
    servers = start_servers(specs, tmp)
    try:
        measured = measure(servers, {}, body, args.rounds, args.per_round, args.clients)
        measured["model_fn"] = model_fn_lines(servers)
    finally:
        stop_all(servers)
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(args.load_before), "versions": versions(),
              "settings": {"archive": "deployed (model.onnx)", "rounds": args.rounds, "per_round": args.per_round,
                           "clients": args.clients, "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"],
                           "environments": {n: s[2] for n, s in specs.items()}},
              **measured}
    lines = [f"Serving-stack knobs, {result['when']}: the deployed archive (model.onnx) under TorchServe, "
             f"load {result['machine']['load_average_before'][0]} -> {result['machine']['load_average_after'][0]}; "
             f"{args.rounds} interleaved rounds.", "",
             *server_table(measured, args.clients, {n: s[2] for n, s in specs.items()})]
    write(result, Path(args.out.replace("endpoint.json", "endpoint_knobs.json")), "\n".join(lines) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds")
    p.add_argument("--per-round", type=int, default=8, help="single-client requests per server per round")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--photos", type=int, default=16, help="natural-ish photos for the top-1 check (and the export)")
    p.add_argument("--real-photos", metavar="PATH", help="real photographs for the top-1 check (and the export): "
                   "a directory of JPEG/PNG files or a scikit-image wheel (see the module docstring)")
    p.add_argument("--knobs", action="store_true", help="compare the stack's Environment settings instead")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "endpoint.json"))
    args = p.parse_args(argv)
    args.load_before = os.getloadavg()
    # Each server gets its threads from its own Environment (SageMaker's default: none set).
    os.environ.pop("OMP_NUM_THREADS", None)
    torch.set_num_threads(2)
    reason = serving.java_missing() or __import__("pipeline.runtime.toolkits", fromlist=["x"]).missing_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    body = jpeg(natural_photo(10_000))
    try:
        real = real_photos(Path(args.real_photos)) if args.real_photos else {}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        print(f"error: --real-photos: {err}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-endpoint-") as tmp:
        tmp = Path(tmp)
        photo_dir = tmp / "photos"
        photo_dir.mkdir()
        photos = []
        for i in range(args.photos):
            photos.append(photo_dir / f"photo_{i}.jpg")
            photos[-1].write_bytes(jpeg(natural_photo(i)))
        for name, raw in real.items():  # the export is validated on them too
            photos.append(photo_dir / f"real_{name}.jpg")
            photos[-1].write_bytes(raw)
        archives = build_archives(tmp, args.arch, args.image_size, photos)
        if args.knobs:
            return knobs(args, tmp, archives, body)
        return compare(args, tmp, archives, body, [p.read_bytes() for p in photos[:args.photos]], real)


if __name__ == "__main__":
    sys.exit(main())
