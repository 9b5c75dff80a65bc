"""The final training job: train_lib's loop plus the Debugger hook and the profiler.

  python train_model.py --lr 0.006 --batch-size 64 --epochs 8 [--profile true] [--debug-out DIR]

Debugger: with smdebug importable AND a hook config (SageMaker writes
$SM_INPUT_CONFIG_DIR/debughookconfig.json when the job has Debugger rules) or
--debug-out DIR, losses are saved in TRAIN/EVAL modes and gradients/weights at
an interval, which the rules (VanishingGradient, LossNotDecreasing ...) read.
PyTorch >= 2.3 containers ship without smdebug: then it warns once and trains on.

ONNX export (--export-onnx true, the default): after training, scripts/export.py adds
model.onnx to the model dir, only when ONNX Runtime matches the PyTorch model on every
test image (same top-1, probabilities within 1e-4); otherwise the log says why and the
endpoint serves model.pth with PyTorch.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

import export
import train_lib

DEBUG_CONFIG_FILE = "debughookconfig.json"


def add_flags(parser) -> None:
    g = parser.add_argument_group("train_model.py")
    g.add_argument("--profile", type=train_lib.parse_bool, default=False,
                   help="torch.profiler over a window of training steps -> <output-data-dir>/profiler/")
    g.add_argument("--profile-skip-steps", "--profile_skip_steps", type=train_lib._int, default=5,
                   help="steps before the profiled window (past warm-up effects)")
    g.add_argument("--profile-steps", "--profile_steps", type=train_lib._int, default=10,
                   help="training steps recorded")
    g.add_argument("--debug-out", "--debug_out", type=train_lib._str, default=None,
                   help="smdebug output dir when no Debugger config is present")
    g.add_argument("--debug-save-interval", "--debug_save_interval", type=train_lib._int, default=50,
                   help="steps between saved gradients/weights (with --debug-out)")
    g.add_argument("--export-onnx", "--export_onnx", type=train_lib.parse_bool, default=True,
                   help="after training, add model.onnx (validated on the test split) for the endpoint's fast path")


def debug_config_path() -> Path:
    """Where smdebug itself looks (SMDEBUG_CONFIG_FILE_PATH), else SageMaker's input config dir."""
    if os.environ.get("SMDEBUG_CONFIG_FILE_PATH"):
        return Path(os.environ["SMDEBUG_CONFIG_FILE_PATH"])
    return Path(os.environ.get("SM_INPUT_CONFIG_DIR", "/opt/ml/input/config")) / DEBUG_CONFIG_FILE


class Debugger(train_lib.Callbacks):
    """The smdebug hook, created from the job's config or for --debug-out."""

    def __init__(self, hook, modes):
        self.hook, self.modes = hook, modes

    def on_model(self, model, criterion) -> None:
        if self._saves_regex_with("relu_input"):
            # An in-place ReLU overwrites its input before smdebug's forward hook reads it:
            # "relu_input" would hold the outputs (PoorWeightInitialization reads the inputs).
            # Only then: it costs activation memory the tuning trials did not need.
            for module in model.modules():
                if isinstance(module, torch.nn.ReLU):
                    module.inplace = False
        self.hook.register_module(model)
        self.hook.register_loss(criterion)

    def _saves_regex_with(self, text: str) -> bool:
        return any(any(text in regex for regex in coll.include_regex)
                   for coll in self.hook.collection_manager.get_collections().values()
                   if coll.name in self.hook.include_collections)

    def on_mode(self, mode: str) -> None:
        self.hook.set_mode(self.modes.TRAIN if mode == "train" else self.modes.EVAL)

    def close(self) -> None:
        self.hook.close()


def make_debugger(args) -> Debugger | None:
    config = debug_config_path()
    if not (config.is_file() or args.debug_out):
        return None
    # smdebug logs a line per parameter at INFO; our own line below says where it writes
    os.environ.setdefault("SMDEBUG_LOG_LEVEL", "warning")
    try:  # lazily: the PyTorch >= 2.3 containers have no smdebug
        from smdebug.pytorch import Hook, SaveConfig, modes
    except Exception as err:  # ImportError, or a broken install (protobuf ...)
        print(f"warning: smdebug not importable ({type(err).__name__}: {err}); training without the "
              f"Debugger hook (pip install smdebug, see requirements.txt)", file=sys.stderr, flush=True)
        return None
    if config.is_file():
        # smdebug's own reader: honours the config's LocalPath, HookParameters, collections
        hook = Hook.create_from_json_file(str(config))
        print(f"debugger: hook from {config} -> {json.loads(config.read_text()).get('LocalPath')}", flush=True)
    else:
        hook = Hook(out_dir=args.debug_out, save_config=SaveConfig(save_interval=args.debug_save_interval),
                    include_collections=["losses", "gradients", "weights", "biases"])
        print(f"debugger: hook -> {args.debug_out} every {args.debug_save_interval} steps", flush=True)
    return Debugger(hook, modes)


class Profiler(train_lib.Callbacks):
    """torch.profiler over `steps` training steps after `skip`; writes a Chrome trace
    and a summary (top ops, time waiting for the DataLoader)."""

    def __init__(self, out_dir: Path, skip: int, steps: int):
        self.out_dir, self.steps = out_dir, steps
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=max(0, skip - 1), warmup=1, active=steps, repeat=1),
            on_trace_ready=self._write)
        self.started = self.done = False
        self.window_start = None

    def on_model(self, model, criterion) -> None:
        self.prof.start()
        self.started = True

    def on_step(self) -> None:
        if self.done:
            return
        self.prof.step()
        if self.window_start is None and self.prof.current_action == torch.profiler.ProfilerAction.RECORD:
            self.window_start = time.perf_counter()

    def _write(self, prof) -> None:
        self.done = True
        seconds = time.perf_counter() - self.window_start if self.window_start else None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out_dir / "trace.json"))
        averages = prof.key_averages()
        device_attr = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") \
            else "self_cuda_time_total"
        # DataLoader iterators wrap __next__ in a record_function named "enumerate(DataLoader)#..."
        wait_us = sum(e.cpu_time_total for e in averages if e.key.startswith("enumerate(DataLoader)"))
        top = sorted((e for e in averages if not e.key.startswith(("enumerate(DataLoader)", "ProfilerStep"))),
                     key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
        summary = {
            "steps": self.steps,
            "window_seconds": seconds,
            "dataloader_wait_seconds": wait_us / 1e6,
            "dataloader_wait_fraction": (wait_us / 1e6 / seconds) if seconds else None,
            "top_ops": [{"name": e.key, "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                         "cpu_total_ms": e.cpu_time_total / 1e3,
                         "self_device_ms": getattr(e, device_attr, 0) / 1e3} for e in top],
        }
        train_lib.atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2))
        sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        train_lib.atomic_write_text(self.out_dir / "summary.txt", averages.table(sort_by=sort_by, row_limit=25))
        print(f"profiler: {self.steps} steps, dataloader wait {summary['dataloader_wait_seconds']:.2f}s"
              + (f" of {seconds:.2f}s" if seconds else "") + f" -> {self.out_dir}", flush=True)

    def close(self) -> None:
        if self.started and not self.done:
            self.prof.stop()  # a window cut short by the end of training is still written


def make_callbacks(args) -> list[train_lib.Callbacks]:
    if int(os.environ.get("RANK", 0)) != 0:  # one writer: rank 0
        return []
    callbacks = []
    debugger = make_debugger(args)
    if debugger:
        callbacks.append(debugger)
    if args.profile:
        callbacks.append(Profiler(Path(args.output_data_dir) / "profiler", args.profile_skip_steps,
                                  args.profile_steps))
    return callbacks


def main(argv: list[str]) -> int:
    """Train; then (rank 0) add the validated ONNX export to the model dir."""
    seen = {}

    def callbacks(args):
        seen["args"] = args
        return make_callbacks(args)

    status = train_lib.main(argv, prog="train_model.py", extend=add_flags, make_callbacks=callbacks)
    args = seen.get("args")
    if status == 0 and args is not None and args.export_onnx and int(os.environ.get("RANK", 0)) == 0:
        _, samples = train_lib.scan_dataset(train_lib.data_dirs(args, require_test=True))
        export.export_after_training(args.model_dir, [path for path, _ in samples["test"]], train_lib.load_image)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
