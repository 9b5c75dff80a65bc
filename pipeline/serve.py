"""Local endpoint speaking SageMaker's serving contract, over the model's own handlers.

    python run_pipeline.py --serve model.tar.gz [--port 8080]
    python -m pipeline.serve MODEL [--port 0] [--max-batch-size 8] [--max-batch-delay-ms 5] ...

MODEL is a model.tar.gz or a model dir as the training job writes it. Like the
SageMaker PyTorch container, the server imports code/$SAGEMAKER_PROGRAM
(inference.py) from the model and calls its model_fn / input_fn / predict_fn /
output_fn, so what answers here is what answers on AWS.

  GET  /ping         200 once model_fn has returned, 503 before
  POST /invocations  Content-Type + Accept as on SageMaker; 6 MB body limit (413)

Dynamic batching (TorchServe's batch_size / max_batch_delay): requests decoded
by input_fn queue up; one predict_fn call takes up to max_batch_size images.
While a forward pass runs the next batch gathers for free; beyond that the
batcher waits up to max_batch_delay_ms for more, but only while other requests
are still being decoded, so a lone client never waits for company.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import importlib.util
import inspect
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.archives import extract_tar
from pipeline.errors import UserError
from pipeline.files import atomic_write

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PORT = 8080
MAX_BODY_BYTES = 6 * 1024 * 1024  # SageMaker real-time endpoints' payload limit
DRAIN_BYTES = 64 * 1024 * 1024
# Bounds on what clients can hold: memory of bodies and decoded images in flight, a connection
# that sends nothing, and a request whose headers trickle in (slowloris).
DEFAULT_MAX_QUEUED_MB = 256
DEFAULT_IDLE_TIMEOUT_S = 5.0
DEFAULT_HEADER_TIMEOUT_S = 10.0
UTF8_TYPES = ("application/json", "text/csv")  # the inference toolkit hands these to input_fn as str

log = logging.getLogger("pipeline.serve")


class ServeError(UserError, ValueError):
    """A model, archive, address or option the server cannot start with (one line, exit 1)."""


# ---------------------------------------------------------------- model archive

def resolve_model(model: str | os.PathLike, workdir: str | os.PathLike) -> Path:
    """A model dir as it is, or a model.tar.gz extracted under workdir."""
    path = Path(model)
    if path.is_dir():
        return path.resolve()
    if not path.exists():
        raise ServeError(f"MODEL {str(model)!r}: no such file or folder; give a model.tar.gz or a model dir")
    try:
        if path.is_file() and tarfile.is_tarfile(path):
            return extract_tar(path, Path(workdir) / "model")
    except ServeError:
        raise
    except ValueError as err:  # extract_tar's refusals
        raise ServeError(str(err)) from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:  # truncated or corrupt gzip/tar
        raise ServeError(f"MODEL {str(model)!r}: the archive is truncated or corrupt ({type(err).__name__}: "
                         f"{' '.join(str(err).split())}); rebuild model.tar.gz") from None
    raise ServeError(f"MODEL {str(model)!r} is neither a model dir nor a model.tar.gz")


# ---------------------------------------------------------------- handlers

class Handlers:
    """code/<program> from a model dir, called as the SageMaker inference toolkit calls it."""

    def __init__(self, model_dir: Path, program: str | None = None):
        program = program or os.environ.get("SAGEMAKER_PROGRAM") or "inference.py"
        code_dir = model_dir / "code"
        path = code_dir / (program if program.endswith(".py") else program + ".py")
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the model archive must hold code/{path.name} "
                                    f"(SAGEMAKER_PROGRAM={program})")
        # The container puts code/ on sys.path (SAGEMAKER_SUBMIT_DIRECTORY), so do we.
        sys.path.insert(0, str(code_dir))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        self.module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = self.module
        spec.loader.exec_module(self.module)
        missing = [f for f in ("model_fn", "input_fn", "predict_fn", "output_fn") if not hasattr(self.module, f)]
        if missing:
            raise AttributeError(f"{path} does not define {', '.join(missing)}")
        self.model_dir, self.program, self.model = model_dir, path.name, None

    def _call(self, name: str, *args):
        fn = getattr(self.module, name)
        if len(inspect.signature(fn).parameters) == len(args) + 1:  # handlers may take a context
            args = args + (None,)
        return fn(*args)

    def load(self):
        self.model = self._call("model_fn", str(self.model_dir))

    def input(self, body, content_type):
        return self._call("input_fn", body, content_type)

    def predict(self, data):
        return self._call("predict_fn", data, self.model)

    def output(self, prediction, accept):
        return self._call("output_fn", prediction, accept)


def _batchable(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("images"), list) and len(data["images"]) > 0


def _size(data) -> int:
    return len(data["images"]) if _batchable(data) else 1


def predict_batch(handlers: Handlers, datas: list) -> list:
    """One predict_fn call for several requests' inputs, split back per request
    (inference.py's {"images": [...]} -> {"probabilities": rows} convention).
    Inputs of any other shape are predicted one by one. An item's exception is
    returned in its place, and a failed batch is retried item by item so that one
    bad request does not fail its neighbours."""
    if len(datas) > 1 and all(_batchable(d) for d in datas):
        try:
            prediction = handlers.predict({**datas[0], "images": [im for d in datas for im in d["images"]]})
        except Exception:  # noqa: BLE001 - isolate the culprit below
            log.warning("batched predict_fn failed; retrying its %d requests one by one", len(datas))
        else:
            rows, out, start = prediction["probabilities"], [], 0
            for d in datas:
                n = len(d["images"])
                out.append({**prediction, "probabilities": rows[start:start + n], "batch": d.get("batch")})
                start += n
            return out
    out = []
    for d in datas:
        try:
            out.append(handlers.predict(d))
        except Exception as err:  # noqa: BLE001
            out.append(err)
    return out


class Batcher:
    """Gathers queued inputs into predict_fn calls on one inference thread."""

    def __init__(self, handlers: Handlers, max_batch_size: int, max_batch_delay_s: float):
        self.handlers, self.max_batch_size, self.max_delay = handlers, max_batch_size, max_batch_delay_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arriving = 0  # requests still in input_fn: worth waiting for
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="predict")
        self._held = None

    async def predict(self, data):
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((data, future))
        return await future

    async def _next(self, timeout: float | None):
        if self._held is not None:
            item, self._held = self._held, None
            return item
        if timeout is None:
            return await self.queue.get()
        if not self.queue.empty():
            return self.queue.get_nowait()
        if timeout <= 0 or self.arriving == 0:
            return None
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def run(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._next(None)]
            size, deadline = _size(batch[0][0]), loop.time() + self.max_delay
            while size < self.max_batch_size:
                item = await self._next(deadline - loop.time())
                if item is None:
                    break
                if size + _size(item[0]) > self.max_batch_size:
                    self._held = item  # first in the next batch
                    break
                batch.append(item)
                size += _size(item[0])
            batch = [(d, f) for d, f in batch if not f.done()]  # timed-out requests
            if not batch:
                continue
            size = sum(_size(d) for d, _ in batch)
            try:
                results = await loop.run_in_executor(self.executor, predict_batch, self.handlers, [d for d, _ in batch])
            except Exception as err:  # noqa: BLE001 - e.g. a prediction of an unexpected shape
                results = [err] * len(batch)
            for (_, f), result in zip(batch, results):
                if f.done():
                    continue
                if isinstance(result, Exception):
                    f.set_exception(result)
                else:
                    f.set_result((result, size))
            batch = results = item = _ = None  # decoded images must not outlive their requests while idle


# ---------------------------------------------------------------- HTTP app

class HTTPError(Exception):
    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code, self.message = status_code, message


def _error_status(err: BaseException) -> tuple[int, str]:
    """The toolkit's rule: an error carrying status_code (BaseInferenceToolkitError
    and kin) is the client's answer; anything else is a 500 whose details stay in the log."""
    status = getattr(err, "status_code", None)
    if isinstance(status, int) and 400 <= status < 600:
        return status, str(getattr(err, "message", None) or err)
    return 500, f"internal error in the model's handlers ({type(err).__name__}); see the server log"


class MemoryBudget:
    """Bytes of request bodies and decoded inputs the server holds at once (read, decoded,
    queued for a batch or in a forward pass). A request that would go over it is answered
    503 at once rather than queued: many concurrent 40 MP images must not take all memory."""

    def __init__(self, limit_bytes: int):
        self.limit, self.held, self.released = limit_bytes, 0, 0

    def take(self, size: int, what: str, held: list[int]) -> None:
        """Count `size` more bytes for a request already holding `held` (appended to it, refused
        or not: the bytes are in memory until the request ends). A request alone is never
        refused (inference.py bounds each request); one among others is, past the limit."""
        others = self.held - sum(held)
        held.append(size)
        self.held += size
        if others > 0 and self.held > self.limit:
            raise HTTPError(503, f"server busy: {what} ({size / 2**20:.1f} MiB) would take the memory held for "
                                 f"requests over the limit of {self.limit / 2**20:g} MiB (--max-queued-mb); "
                                 f"retry shortly")

    def give(self, held: list[int]) -> None:
        self.held -= sum(held)
        self.released += sum(held)

    def trim_if_idle(self) -> None:
        if self.held == 0 and self.released >= TRIM_AFTER_BYTES:
            self.released = 0
            _release_to_os()


# glibc keeps freed memory of large decoded images in its per-thread arenas (RSS stayed at
# 3.4 GB after a burst of 40 MP PNGs); give it back when the server goes idle after this much
# was released (malloc_trim takes about a millisecond).
TRIM_AFTER_BYTES = 64 * 2**20


def _release_to_os() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _input_bytes(data) -> int:
    """Memory a decoded input holds: PIL keeps 4 bytes per pixel for RGB (1 for L); anything
    else (a program with its own input shape) counts its tensors or nothing."""
    if not _batchable(data):
        return 0
    total = 0
    for image in data["images"]:
        if hasattr(image, "width") and hasattr(image, "getbands"):
            total += image.width * image.height * (1 if image.mode in ("L", "P", "1") else 4)
        elif hasattr(image, "element_size"):
            total += image.element_size() * image.nelement()
    return total


def build_app(model_dir: Path, *, program: str | None = None, max_batch_size: int = 8,
              max_batch_delay_ms: float = 5.0, timeout_s: float = 60.0, io_threads: int = 4,
              default_accept: str | None = None, on_load_failure=None, max_queued_mb: float = DEFAULT_MAX_QUEUED_MB):
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    default_accept = default_accept or os.environ.get("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT", "application/json")
    state = {"ready": False, "batcher": None, "handlers": None}
    io_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="io")
    memory = MemoryBudget(int(max_queued_mb * 2**20))

    def load():
        handlers = Handlers(model_dir, program)
        handlers.load()
        _warm_up(handlers)
        return handlers

    async def startup():
        loop = asyncio.get_running_loop()
        try:
            state["handlers"] = handlers = await loop.run_in_executor(io_pool, load)
        except Exception as err:
            log.error("loading the model failed", exc_info=err)
            first_line = (str(err).strip().splitlines() or [""])[0]
            log.error("loading the handlers or model_fn failed, so the endpoint cannot serve %s: %s: %s",
                      model_dir, type(err).__name__, first_line)
            if on_load_failure:
                on_load_failure(f"{model_dir}: loading the handlers or model_fn failed: {type(err).__name__}: "
                                f"{first_line}; see the log above")
            return
        state["batcher"] = Batcher(handlers, max_batch_size, max_batch_delay_ms / 1000)
        state["task"] = asyncio.create_task(state["batcher"].run())
        state["ready"] = True
        log.info("model loaded from %s (%s): ready", model_dir, handlers.program)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loader = asyncio.create_task(startup())  # bind now; /ping says 503 until loaded
        yield
        loader.cancel()
        if state.get("task"):
            state["task"].cancel()
        io_pool.shutdown(wait=False, cancel_futures=True)
        if state["batcher"]:
            state["batcher"].executor.shutdown(wait=False, cancel_futures=True)

    async def ping(request):
        status = 200 if state["ready"] else 503
        return JSONResponse({"status": "ready" if state["ready"] else "loading"}, status_code=status)

    async def read_body(request) -> bytes:
        # An over-large body is still read (and dropped) up to a bound, so that the
        # client, which is busy sending, gets to see the 413 rather than a reset.
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= MAX_BODY_BYTES:
                chunks.append(chunk)
            elif size > DRAIN_BYTES:
                break
        if size > MAX_BODY_BYTES:
            raise HTTPError(413, f"body is {'over ' if size > DRAIN_BYTES else ''}{size} bytes: the limit is "
                                 f"{MAX_BODY_BYTES} bytes (6 MB, as on SageMaker real-time endpoints)")
        return b"".join(chunks)

    async def handle(request, meta: dict):
        held: list[int] = []
        try:
            return await handle_within(request, meta, held)
        finally:  # answered, failed or timed out: the memory is free for the next request
            memory.give(held)
            if memory.held == 0 and memory.released >= TRIM_AFTER_BYTES:  # once error paths let go, too
                asyncio.get_running_loop().call_later(0.05, memory.trim_if_idle)

    async def handle_within(request, meta: dict, held: list):
        loop = asyncio.get_running_loop()
        handlers, batcher = state["handlers"], state["batcher"]
        body = await read_body(request)
        memory.take(len(body), "the request body", held)
        content_type = request.headers.get("content-type")
        accept = request.headers.get("accept")
        if not accept or accept == "*/*":
            accept = default_accept
        if content_type in UTF8_TYPES:  # the toolkit's test: this exact header value, before any handler
            try:
                body = body.decode("utf-8")
            except UnicodeDecodeError as err:
                # The toolkit answers this with a 500 (and a traceback) before any handler runs: same status here.
                raise HTTPError(500, f"body of Content-Type {content_type} is not UTF-8 ({err}): the SageMaker "
                                     f"inference toolkit decodes {' and '.join(UTF8_TYPES)} bodies as UTF-8 before "
                                     f"any handler and answers 500; send UTF-8 text, or an image as image/jpeg "
                                     f"or image/png") from err
        batcher.arriving += 1
        try:
            data = await loop.run_in_executor(io_pool, handlers.input, body, content_type)
        finally:
            batcher.arriving -= 1
        try:
            memory.take(_input_bytes(data), "its decoded images", held)
        except HTTPError:
            data = None  # the traceback keeps this frame: not its images
            raise
        prediction, meta["batch"] = await batcher.predict(data)
        result = await loop.run_in_executor(io_pool, handlers.output, prediction, accept)
        answer, answer_type = result if isinstance(result, tuple) else (result, accept)
        return Response(answer, media_type=answer_type, headers={"X-Batch-Size": str(meta["batch"])})

    async def invocations(request):
        meta = {"batch": 0}
        try:
            if not state["ready"]:
                raise HTTPError(503, "model is still loading: retry when GET /ping answers 200")
            response = await asyncio.wait_for(handle(request, meta), timeout_s)
        except asyncio.TimeoutError:
            response = JSONResponse({"error": f"no answer within {timeout_s:g} s (the request timeout)"},
                                    status_code=504)
        except ClientDisconnect:
            response = Response(status_code=499)
        except Exception as err:  # noqa: BLE001 - the contract: every failure is a JSON answer
            status, message = _error_status(err)
            if status >= 500 and status != 503:
                log.error("handler error on %s", request.url.path, exc_info=err)
            response = JSONResponse({"error": message}, status_code=status,
                                    headers={"Retry-After": "1"} if status == 503 else None)
        return response

    async def not_routed(request, exc):
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}; this endpoint serves "
                                      "GET /ping and POST /invocations"}, status_code=exc.status_code)

    routes = [Route("/ping", ping, methods=["GET"]), Route("/invocations", invocations, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_routed, 405: not_routed})
    return access_log(app)


def access_log(app):
    """One log line per HTTP request: client, request, status, latency, batch size."""
    async def logged(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        started, seen = time.perf_counter(), {"status": 0, "batch": "0"}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                seen["batch"] = dict(message.get("headers", [])).get(b"x-batch-size", b"0").decode()
            await send(message)

        try:
            await app(scope, receive, send_and_note)
        finally:
            client = scope.get("client") or ("-",)
            log.info('%s "%s %s" %d %.1fms batch=%s', client[0], scope["method"], scope["path"], seen["status"],
                     (time.perf_counter() - started) * 1000, seen["batch"])

    return logged


def _warm_up(handlers: Handlers):
    """One tiny request through the handlers so the first client does not pay for
    lazy initialisation (oneDNN kernels, allocator). Best effort: any program
    that does not take a PNG simply skips it."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (127, 127, 127)).save(buf, "PNG")
    try:
        handlers.output(handlers.predict(handlers.input(buf.getvalue(), "image/png")), "application/json")
    except Exception as err:  # noqa: BLE001
        log.info("warm-up skipped: %s", err)


# ---------------------------------------------------------------- entry points

def serve(model: str | os.PathLike, host: str = "127.0.0.1", port: int | None = None, *,
          program: str | None = None, max_batch_size: int = 8, max_batch_delay_ms: float = 5.0,
          timeout_s: float = 60.0, threads: int | None = None, url_file: str | None = None,
          max_queued_mb: float = DEFAULT_MAX_QUEUED_MB, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
          header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S) -> int:
    """Serve MODEL until SIGTERM/SIGINT; returns the exit status (0 after a clean stop)."""
    for flag, value in (("--max-queued-mb", max_queued_mb), ("--idle-timeout-s", idle_timeout_s),
                        ("--header-timeout-s", header_timeout_s), ("--timeout-s", timeout_s)):
        if not value > 0:
            raise ServeError(f"{flag} {value}: must be a positive number")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if port is None:
        port = os.environ.get("SAGEMAKER_BIND_TO_PORT", str(DEFAULT_PORT))
        if not port.isdigit():
            raise ServeError(f"SAGEMAKER_BIND_TO_PORT={port!r}: not a port number; use 0-65535")
        port = int(port)
    workdir = tempfile.mkdtemp(prefix="serve-")
    try:
        model_dir = resolve_model(model, workdir)  # a bad archive fails before the slow imports
        import torch
        import uvicorn

        # intra-op threads do the forward pass; input decoding runs on a few extra threads
        torch.set_num_threads(threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1)
        # one inference thread runs every forward pass: no other worker to share the cores
        # with (inference.py CoreShare), so no extra ONNX Runtime sessions for it
        os.environ["INFERENCE_SHARE_CORES"] = "0"
        sock = bind_socket(host, port)
        url = f"http://{host}:{sock.getsockname()[1]}"
        server = None
        failed = []

        def on_load_failure(message: str):
            failed.append(message)
            server.should_exit = True

        app = build_app(model_dir, program=program, max_batch_size=max_batch_size,
                        max_batch_delay_ms=max_batch_delay_ms, timeout_s=timeout_s, on_load_failure=on_load_failure,
                        max_queued_mb=max_queued_mb)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=30,
                                limit_concurrency=1000, lifespan="on", timeout_keep_alive=idle_timeout_s,
                                http=_protocol_class(idle_timeout_s, header_timeout_s))
        server = _server_class()(config)
        log.info("serving %s on %s (max_batch_size=%d, max_batch_delay=%gms, timeout=%gs, torch threads=%d, "
                 "max_queued=%gMB, idle_timeout=%gs, header_timeout=%gs)", model, url, max_batch_size,
                 max_batch_delay_ms, timeout_s, torch.get_num_threads(), max_queued_mb, idle_timeout_s,
                 header_timeout_s)
        if url_file:
            atomic_write(url_file, url)
        server.run(sockets=[sock])
        log.info("stopped")
        if failed:  # the traceback is in the log; the reason ends it as README's one error line
            raise ServeError(failed[0])
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening address, or one ServeError line saying why not (port in use, out of range, bad host)."""
    if not 0 <= port <= 65535:
        raise ServeError(f"--port {port}: out of range; a port is 0-65535 (0 picks a free one)")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as err:
        sock.close()
        why = "is in use" if getattr(err, "errno", None) == errno.EADDRINUSE else f"cannot be bound ({err})"
        raise ServeError(f"--host {host} --port {port}: {host}:{port} {why}; pick a free port (0 picks one)") from None
    return sock


def _protocol_class(idle_timeout_s: float, header_timeout_s: float):
    """uvicorn's h11 protocol with two timers it lacks: a connection that sends nothing for
    idle_timeout_s is closed (uvicorn only times out keep-alive connections after a response),
    and a request's head must be complete within header_timeout_s of its first byte."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(idle_timeout_s, self._close_idle, "idle")

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._header_timer = self.loop.call_later(header_timeout_s, self._close_idle, "header")
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:  # a request head arrived
                self._stop_header_timer()

        def on_response_complete(self) -> None:
            self._stop_header_timer()
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def _stop_header_timer(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _close_idle(self, why: str) -> None:
            self._header_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            log.info("closing connection from %s: %s", (self.client or ("-",))[0],
                     f"nothing sent for {idle_timeout_s:g} s (--idle-timeout-s)" if why == "idle" else
                     f"request headers incomplete after {header_timeout_s:g} s (--header-timeout-s)")
            if why == "header":  # the client is mid-request: tell it why (it is never read, so no h11 state)
                body = (b'{"error": "request headers incomplete after %g s (--header-timeout-s)"}'
                        % header_timeout_s)
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    return TimedH11Protocol


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises SIGTERM after its graceful shutdown, so the process
            # would die of the signal; a clean stop should exit 0.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


class Endpoint:
    """A server subprocess (see launch). With port 0, `url` is known once wait_ready() returns."""

    def __init__(self, process: subprocess.Popen, url_file: Path, log_path: Path, url: str | None = None):
        self.process, self.url_file, self.log_path, self.url = process, url_file, log_path, url

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 120.0) -> Endpoint:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"endpoint exited with status {self.process.returncode} before it was ready; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            if self.url is None and self.url_file.is_file():
                self.url = self.url_file.read_text().strip()
            if self.url is not None:
                try:
                    with urllib.request.urlopen(self.url + "/ping", timeout=5) as reply:
                        if reply.status == 200:
                            return self
                except (urllib.error.URLError, OSError):
                    pass
            time.sleep(0.1)
        raise TimeoutError(f"endpoint not ready after {timeout:g} s; log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful: in-flight requests finish), SIGKILL after timeout; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def launch(model: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, env: dict | None = None,
           log_path: str | os.PathLike | None = None, **options) -> Endpoint:
    """Start `python -m pipeline.serve MODEL` in the background, in its own session so it
    can outlive the caller (--keep-endpoint). options: serve()'s keyword arguments.
    Call .wait_ready() before use; .stop() ends it."""
    state_dir = Path(tempfile.mkdtemp(prefix="endpoint-"))
    log_path = Path(log_path) if log_path else state_dir / "endpoint.log"
    url_file = state_dir / "url"
    cmd = [sys.executable, "-m", "pipeline.serve", str(Path(model).resolve()), "--host", host,
           "--port", str(port), "--url-file", str(url_file)]
    for name, value in options.items():
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    with open(log_path, "ab") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Endpoint(process, url_file, log_path, url=f"http://{host}:{port}" if port else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve a model.tar.gz or model dir (SageMaker's serving contract).")
    p.add_argument("model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None,
                   help="0 picks a free port (default: SAGEMAKER_BIND_TO_PORT or 8080)")
    p.add_argument("--program", help="handler file in code/ (default: SAGEMAKER_PROGRAM or inference.py)")
    p.add_argument("--max-batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--max-batch-delay-ms", type=float, default=5.0, help="wait this long for more requests")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per-request timeout (SageMaker: 60 s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: OMP_NUM_THREADS or CPUs)")
    p.add_argument("--url-file", help="write the server's URL here once bound")
    p.add_argument("--max-queued-mb", type=float, default=DEFAULT_MAX_QUEUED_MB,
                   help="memory for request bodies and decoded images held at once; beyond it 503")
    p.add_argument("--idle-timeout-s", type=float, default=DEFAULT_IDLE_TIMEOUT_S,
                   help="close a connection that sends nothing for this long")
    p.add_argument("--header-timeout-s", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                   help="close a connection whose request headers are not complete this long after they start")
    args = p.parse_args(argv)
    try:
        return serve(args.model, host=args.host, port=args.port, program=args.program,
                     max_batch_size=args.max_batch_size, max_batch_delay_ms=args.max_batch_delay_ms,
                     timeout_s=args.timeout_s, threads=args.threads, url_file=args.url_file,
                     max_queued_mb=args.max_queued_mb, idle_timeout_s=args.idle_timeout_s,
                     header_timeout_s=args.header_timeout_s)
    except ServeError as err:  # README's policy: one line, exit 1, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
