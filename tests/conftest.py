"""Shared test setup: offline, a private cache for the tiny model, and small helpers."""
import fcntl
import os
import sys
from collections.abc import Generator
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


# Under pytest-xdist (``make test``: -n 2 --no-loadscope-reorder) each file runs on one worker, so its module
# fixtures (a training run, a Ray cluster) are built once. The tests that start processes of their own (Ray actors,
# torchrun or gloo ranks) form one group that runs one test after another on one worker: two of them at once on two
# cores ran several times slower than apart (a 17 s Ray test took 105 s, and a 13 s DeepSpeed rank test 72 s, when
# they overlapped). The browser tests form another, so one Chromium runs at a time. Groups are queued in this
# order, before the files, so that neither worker is left with one of them at the end. (xdist's own xdist_group
# mark is not honoured under pytest 9: its worker renames the test's nodeid, which pytest 9 no longer lets it do;
# hence a scheduler of our own.)
XDIST_GROUPS: dict[str, tuple[str, ...]] = {
    "processes": ("tests/test_ray_runner.py", "tests/test_ray_hook.py", "tests/test_timeline_ray.py",
                  "tests/test_ddp.py", "tests/test_straggler_e2e.py", "tests/test_timeline_ddp.py",
                  "tests/test_adapters_ddp.py",
                  "tests/test_timeline_trl.py::test_trl_ranks_under_accelerate_share_one_clock",
                  "tests/test_memory_ds_tp.py::test_deepspeed_autotp_ranks_hold_what_the_planner_says",
                  "tests/test_memory_fsdp.py::test_fsdp1_state_dict_and_summon_match_verls_weight_sync_terms",
                  "tests/test_memory_ulysses.py::test_ulysses_ranks_compute_what_one_process_computes"),
    "browser": ("tests/test_dashboard_browser.py",
                "tests/test_dashboard_whatif.py::test_memory_tab_what_if_recomputes_in_the_browser",
                "tests/test_dashboard_timeline.py::test_timeline_tab_in_chromium_shows_one_row_per_rank"),
}


def xdist_scope(nodeid: str) -> str:
    """The unit of work a test belongs to: its group, else its file."""
    for group, prefixes in XDIST_GROUPS.items():
        if any(nodeid == p or nodeid.startswith((p + "::", p + "[")) for p in prefixes):
            return group
    return nodeid.split("::", 1)[0]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """xdist's scope scheduler, its scopes being :func:`xdist_scope` (for ``-n N``, which means ``--dist load``)."""
    if config.getoption("dist") not in ("load", "loadgroup"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return GroupScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker, the groups first (the scheduler queues units in the order the workers collected)."""
    if not hasattr(config, "workerinput"):
        return
    rank = {name: i for i, name in enumerate(XDIST_GROUPS)}
    items.sort(key=lambda item: rank.get(xdist_scope(item.nodeid), len(rank)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """On an xdist worker, a test marked ``exclusive`` (its assertions are about timing) runs, with its fixtures,
    while no other test does: every test holds a lock file the workers share, shared or, for those, exclusive;
    a turnstile lets a waiting exclusive test in before the other worker's next test."""
    if not hasattr(item.config, "workerinput") or not item.config.option.basetemp:
        return (yield)
    folder = Path(item.config.option.basetemp).parent  # the session's temporary folder, one per run
    mode = fcntl.LOCK_EX if item.get_closest_marker("exclusive") else fcntl.LOCK_SH
    with open(folder / "turnstile.lock", "a") as turnstile, open(folder / "tests.lock", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(lock, mode)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        return (yield)
