"""Shared test setup: offline, a private cache for the tiny model, and small helpers."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("RLHFKIT_HOME", str(Path(__file__).resolve().parent.parent / ".cache" / "rlhfkit"))

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The locally built tiny GPT-2 (built once per cache)."""
    from rlhf_core.tiny_model import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def smoke_run_dir(tmp_path_factory) -> Path:
    """A finished tiny PPO run (1 epoch x 4 steps, batch 2, 6 new tokens, system sampler at 0.2 s), shared by
    every test that needs a real run directory. Treat it as read-only."""
    from rlhf_core.cli.train import main

    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    rc = main(["--epochs", "1", "--steps_per_epoch", "4", "--batch_size", "2", "--max_new_tokens", "6",
               "--sample_interval", "0.2", "--run_dir", str(run_dir)])
    assert rc == 0, f"smoke training run failed with exit code {rc}"
    return run_dir
