"""SystemSampler: a background thread writing CPU, RSS and GPU readings to ``system.jsonl`` at a fixed rate.

Kept off the training hot path: the thread wakes every ``interval_s`` on a drift-free schedule, reads psutil
(process CPU %, RSS; host CPU % and memory) and, where an NVIDIA driver exists, NVML (per GPU: utilisation,
memory used/total, power). Without NVML (no package, no driver, no GPU) it records the CPU fields only,
silently. A failing writer stops the sampler with one warning; it never raises into training.

Record keys (flat, so tables and plots need no unpacking): ``cpu/process_percent`` (100 = one core),
``cpu/system_percent``, ``mem/rss_bytes``, ``mem/system_used_bytes``, ``mem/system_total_bytes``,
``gpu/<i>/util_percent``, ``gpu/<i>/mem_used_bytes``, ``gpu/<i>/mem_total_bytes``, ``gpu/<i>/power_w``;
the writer adds ``time`` and ``rank``.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

import psutil

log = logging.getLogger(__name__)


class SystemWriter(Protocol):
    def system(self, record: dict[str, Any]) -> None: ...


def _try(fn: Any) -> Any:
    try:
        return fn()
    except Exception:  # noqa: BLE001 - any NVMLError means "this reading is not available"
        return None


class Nvml:
    """NVML handles for every GPU the driver sees; ``Nvml.open()`` is None where NVML is unusable."""

    def __init__(self, pynvml: Any, handles: list[tuple[int, Any]]):
        self._nvml = pynvml
        self.handles = handles

    @classmethod
    def open(cls) -> Nvml | None:
        try:
            import pynvml  # nvidia-ml-py
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            handles = [(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # noqa: BLE001 - NVMLError_* (no driver, no library, no permission) all mean "no GPU data"
            return None
        if not handles:
            cls._shutdown(pynvml)
            return None
        return cls(pynvml, handles)

    @staticmethod
    def _shutdown(pynvml: Any) -> None:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down a half-initialised NVML is best effort
            pass

    def read(self) -> dict[str, float]:
        nv, out = self._nvml, {}
        for i, h in self.handles:
            util = _try(lambda h=h: nv.nvmlDeviceGetUtilizationRates(h).gpu)
            mem = _try(lambda h=h: nv.nvmlDeviceGetMemoryInfo(h))
            power_mw = _try(lambda h=h: nv.nvmlDeviceGetPowerUsage(h))  # GPUs without a sensor lack this field
            fields = {"util_percent": util, "power_w": None if power_mw is None else power_mw / 1000.0}
            if mem is not None:
                fields.update(mem_used_bytes=mem.used, mem_total_bytes=mem.total)
            out.update({f"gpu/{i}/{k}": float(v) for k, v in fields.items() if v is not None})
        return out

    def close(self) -> None:
        self._shutdown(self._nvml)


class SystemSampler:
    """``with SystemSampler(writer, interval_s=1.0):`` (or ``start()``/``stop()``) around the run.

    One record every ``interval_s`` seconds (the first after one interval, when CPU % has a baseline) and a
    last one at :meth:`stop`. ``nvml=False`` skips GPU probing.
    """

    def __init__(self, writer: SystemWriter, interval_s: float = 1.0, *, nvml: bool = True):
        if not interval_s > 0:
            raise ValueError(f"sampler interval must be > 0 seconds, got {interval_s!r}")
        self.writer = writer
        self.interval_s = float(interval_s)
        self.samples_written = 0
        self._use_nvml = nvml
        self._nvml: Nvml | None = None
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False

    @property
    def gpus(self) -> int:
        """GPUs being sampled (0 without NVML)."""
        return len(self._nvml.handles) if self._nvml else 0

    def sample(self) -> dict[str, Any]:
        """One reading (CPU % covers the time since the previous reading)."""
        mem = psutil.virtual_memory()
        rec: dict[str, Any] = {
            "cpu/process_percent": self._proc.cpu_percent(None),
            "cpu/system_percent": psutil.cpu_percent(None),
            "mem/rss_bytes": self._proc.memory_info().rss,
            "mem/system_used_bytes": mem.total - mem.available,
            "mem/system_total_bytes": mem.total,
        }
        if self._nvml is not None:
            rec.update(self._nvml.read())
        return rec

    def _write(self) -> bool:
        try:
            self.writer.system(self.sample())
        except Exception as err:  # noqa: BLE001 - the sampler must never take the run down
            if not self._failed:
                log.warning("system sampler stopped: %s: %s", type(err).__name__, err)
            self._failed = True
            return False
        self.samples_written += 1
        return True

    def _loop(self) -> None:
        start = time.monotonic()
        k = 1
        while not self._stop.wait(max(0.0, start + k * self.interval_s - time.monotonic())):
            if not self._write():
                return
            k += 1
            now = time.monotonic()
            if start + k * self.interval_s < now:  # fell behind (suspended, overloaded): skip, do not burst
                k = int((now - start) / self.interval_s) + 1

    def start(self) -> SystemSampler:
        if self._thread is not None:
            return self
        if self._use_nvml:
            self._nvml = Nvml.open()
        self._proc.cpu_percent(None)
        psutil.cpu_percent(None)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="rlhfkit-system-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread, write the last reading, release NVML. Safe to call twice."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=max(5.0, 2 * self.interval_s))
        self._thread = None
        if not self._failed:
            self._write()
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None

    def __enter__(self) -> SystemSampler:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
