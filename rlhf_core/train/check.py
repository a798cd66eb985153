"""``make check`` / ``rlhfkit check``: can this machine run the kit? Imports, versions, device. Writes nothing.

Exit 0 when every required import works, 1 otherwise; optional parts (GPU, Triton, the tiny model cache)
are reported, not required.
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from importlib import metadata

from rlhf_core.tiny_model import _fingerprint, cache_root

REQUIRED_DISTS = ("torch", "transformers", "accelerate", "trl", "dash", "plotly", "tensorboard", "psutil",
                  "pandas", "tqdm", "rich", "tsdownsample")
OPTIONAL_DISTS = ("nvidia-ml-py", "triton")
KIT_MODULES = ("rlhf_core.train.runner", "rlhf_core.runformat.run_reader", "rlhf_core.stability.detectors",
               "profiler.phases", "profiler.sampler", "profiler.tracing", "memory.logprobs", "dashboard.app",
               "adapters.trl")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _try_import(name: str) -> tuple[bool, str, float]:
    t0 = time.perf_counter()
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - any failure to import is what this command reports
        return False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", time.perf_counter() - t0
    return True, "ok", time.perf_counter() - t0


def _device_lines() -> list[str]:
    import torch

    lines = [f"torch threads: {torch.get_num_threads()}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}")
        lines.append(f"device auto → cuda (CUDA {torch.version.cuda})")
    else:
        lines.append("no CUDA device: device auto → cpu (gloo for multi-process)")
    lines.append(f"bf16 on CPU: {'yes' if hasattr(torch, 'bfloat16') else 'no'}")
    return lines


def _tiny_model_line() -> str:
    target = cache_root() / "models" / f"tiny-gpt2-{_fingerprint(0)}"
    state = "cached" if (target / "rlhfkit_tiny.json").exists() else "not built yet (built on first train, ~3 s)"
    return f"tiny model: {target} ({state})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhfkit check", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    ok = True
    print(f"python {platform.python_version()} on {platform.platform()}")
    print("packages:")
    for dist in REQUIRED_DISTS:
        version = _version(dist)
        ok &= version is not None
        print(f"  {dist:<14} {version or 'MISSING'}")
    for dist in OPTIONAL_DISTS:
        print(f"  {dist:<14} {_version(dist) or 'not installed (optional)'}")
    print("kit modules:")
    for name in KIT_MODULES:
        good, msg, secs = _try_import(name)
        ok &= good
        print(f"  {name:<22} {msg} ({secs:.2f} s)")
    print("device:")
    try:
        for line in _device_lines():
            print(f"  {line}")
    except ImportError as err:
        ok = False
        print(f"  torch unusable: {err}")
    print(_tiny_model_line())
    print("check: OK" if ok else "check: FAILED (see MISSING/errors above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
