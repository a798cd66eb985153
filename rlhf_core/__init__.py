"""RLHF Systems Kit core: the thin PPO runner, the run format and the stability signals.

Import-light on purpose: the dashboard and the reader must not pull in torch.
"""
from rlhf_core.runformat.keys import FORMAT_VERSION, PHASES
from rlhf_core.runformat.run_reader import Run, RunError, list_runs

__all__ = ["FORMAT_VERSION", "PHASES", "Run", "RunError", "list_runs"]
__version__ = "0.1.0"
