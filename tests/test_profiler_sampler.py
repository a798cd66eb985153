"""SystemSampler: records at the set rate, stops with the run, survives a missing or broken NVML and writer."""
import sys
import threading
import time
import types

import pytest

from profiler.sampler import Nvml, SystemSampler
from rlhf_core.runformat.run_reader import Run
from rlhf_core.runformat.run_writer import RunWriter


class ListWriter:
    def __init__(self, fail_after: int | None = None):
        self.records: list[dict] = []
        self.fail_after = fail_after

    def system(self, record: dict) -> None:
        if self.fail_after is not None and len(self.records) >= self.fail_after:
            raise OSError("disk full")
        self.records.append(dict(record, t=time.monotonic()))


def test_records_at_the_set_rate_and_stops_with_the_run():
    writer = ListWriter()
    sampler = SystemSampler(writer, interval_s=0.05, nvml=False)
    t0 = time.monotonic()
    with sampler:
        time.sleep(0.6)
    stopped = time.monotonic()
    n = len(writer.records)
    # 12 periodic readings + 1 at stop; a loaded CPU can delay wake-ups, never add readings
    assert 6 <= n <= 14, n
    assert all(r["t"] <= stopped for r in writer.records)
    gaps = [b["t"] - a["t"] for a, b in zip(writer.records, writer.records[1:-1])]
    assert sorted(gaps)[len(gaps) // 2] == pytest.approx(0.05, abs=0.03)
    time.sleep(0.2)
    assert len(writer.records) == n, "sampler kept writing after stop()"
    assert not [t for t in threading.enumerate() if t.name == "rlhfkit-system-sampler"]
    rec = writer.records[0]
    assert rec["mem/rss_bytes"] > 0 and rec["mem/system_total_bytes"] >= rec["mem/system_used_bytes"] > 0
    assert rec["cpu/process_percent"] >= 0
    assert t0 <= writer.records[0]["t"]


def test_writes_system_jsonl_through_the_run_writer(tmp_path):
    with (RunWriter(tmp_path / "run", source="generic", tensorboard=False) as w,
          SystemSampler(w, interval_s=0.05, nvml=False)):
        time.sleep(0.25)
    recs = Run(tmp_path / "run").system()
    assert len(recs) >= 3
    assert {"time", "rank", "cpu/process_percent", "mem/rss_bytes"} <= set(recs[0])


def test_nvml_missing_is_silent(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as if nvidia-ml-py were not installed
    assert Nvml.open() is None
    writer = ListWriter()
    with SystemSampler(writer, interval_s=0.05) as s:
        time.sleep(0.12)
    assert s.gpus == 0 and writer.records
    assert not [k for r in writer.records for k in r if k.startswith("gpu/")]


def test_nvml_without_driver_is_silent():
    # the real nvidia-ml-py on this GPU-less machine: nvmlInit fails, so no GPU fields and no error
    pytest.importorskip("pynvml")
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        assert Nvml.open() is None
    else:
        pynvml.nvmlShutdown()
        pytest.skip("an NVIDIA driver is present here")


def _fake_pynvml(power_fails: bool) -> types.ModuleType:
    """Stands in for the NVML C library, which needs a GPU; it exercises only our field mapping."""
    nv = types.ModuleType("pynvml")
    nv.nvmlInit = lambda: None
    nv.nvmlShutdown = lambda: None
    nv.nvmlDeviceGetCount = lambda: 1
    nv.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=37, memory=10)
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30, free=77 * 2**30)

    def power(h):
        if power_fails:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return 251_000

    nv.nvmlDeviceGetPowerUsage = power
    return nv


@pytest.mark.parametrize("power_fails", [False, True])
def test_gpu_fields_from_nvml(monkeypatch, power_fails):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(power_fails))
    sampler = SystemSampler(ListWriter(), interval_s=1.0)
    sampler._nvml = Nvml.open()
    rec = sampler.sample()
    assert rec["gpu/0/util_percent"] == 37.0
    assert rec["gpu/0/mem_used_bytes"] == 3 * 2**30 and rec["gpu/0/mem_total_bytes"] == 80 * 2**30
    assert ("gpu/0/power_w" in rec) is not power_fails
    if not power_fails:
        assert rec["gpu/0/power_w"] == 251.0


def test_a_failing_writer_stops_the_sampler_quietly(caplog):
    writer = ListWriter(fail_after=2)
    with SystemSampler(writer, interval_s=0.02, nvml=False) as s:
        time.sleep(0.2)
    assert len(writer.records) == 2 and s.samples_written == 2
    assert "system sampler stopped" in caplog.text


def test_bad_interval_is_refused():
    with pytest.raises(ValueError, match="interval"):
        SystemSampler(ListWriter(), interval_s=0)


def test_stop_twice_and_start_twice_are_safe():
    writer = ListWriter()
    s = SystemSampler(writer, interval_s=0.05, nvml=False)
    s.start()
    s.start()
    s.stop()
    s.stop()
    assert len(writer.records) >= 1
