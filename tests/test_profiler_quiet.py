"""Kineto's ``USDT: ... profiler_start/stop`` lines stay off the console of a profiled run; other output does not."""
import os
import subprocess
import sys
import textwrap

from profiler.kineto_log import quiet_kineto


def test_usdt_lines_are_dropped_and_the_rest_passes_through(capfd):
    with quiet_kineto():
        os.write(2, b"USDT:2026-01-01 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        print("python text", file=sys.stderr)
        os.write(2, b"a kineto error line\n")
    err = capfd.readouterr().err
    assert err == "python text\na kineto error line\n"


def test_a_traced_run_prints_no_usdt_line(tmp_path, repo_root):
    """In a fresh process (kineto logs to the real descriptor 2): a trace window and a memory measurement."""
    code = textwrap.dedent(f"""
        import torch
        from memory.measure import track_peak
        from profiler.tracing import TraceSession

        with TraceSession({str(tmp_path / "traces")!r}, wait=0, warmup=1, active=1, with_stack=False) as session:
            for _ in range(3):
                torch.ones(64, 64) @ torch.ones(64, 64)
                session.step()
        with track_peak("cpu"):
            torch.ones(64, 64) @ torch.ones(64, 64)
        print("traced", len(session.windows))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "traced 1" in out.stdout
    assert "USDT" not in out.stderr and "profiler_start" not in out.stderr, out.stderr


def test_loading_a_model_draws_no_progress_bar(repo_root):
    """transformers 5 draws a "Loading weights" bar for every from_pretrained; the runner loads quietly and
    leaves the user's own setting as it was."""
    code = textwrap.dedent("""
        import torch
        from transformers.utils import logging as hf_logging
        from rlhf_core.tiny_model import tiny_model_path
        from rlhf_core.train.policy import load_causal_lm

        load_causal_lm(str(tiny_model_path()), "fp32", torch.device("cpu"))
        print("bar still on:", hf_logging.is_progress_bar_enabled())
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bar still on: True" in out.stdout
    assert "Loading weights" not in out.stderr, out.stderr
