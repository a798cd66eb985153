"""``rlhfkit``: one command line for the kit. Each subcommand lives in the module that does the work.

Subcommand modules are imported only when used, so ``rlhfkit --help`` and the torch-free commands stay fast.
Every ``main(argv)`` returns an exit code; bad arguments are one-line errors, never tracebacks.

Exit codes shared by all commands: 0 success, 1 the command's own "not good" verdict (``diagnose``: a
critical alert; ``report``: no step records yet), 2 bad input, 3 an internal error (a bug: one line here, the
traceback with ``RLHFKIT_DEBUG=1``), 130 interrupted.
"""
from __future__ import annotations

import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("rlhf_core.cli.train", "train the thin PPO runner (same flags as train.py)"),
    "dashboard": ("dashboard.app", "serve the Dash dashboard over a runs folder"),
    "report": ("profiler.report", "per-phase time/memory report of a run"),
    "timeline": ("profiler.timeline_trace", "all ranks' phases in one Chrome/Perfetto trace; who waited for whom"),
    "diagnose": ("rlhf_core.cli.diagnose", "run the stability detectors over a run (exit 1 on critical)"),
    "samples": ("rlhf_core.runformat.samples", "print the prompts and completions a run kept (samples.jsonl)"),
    "memory": ("memory.cli", "predict, measure and plan the memory of an RLHF step"),
    "import": ("adapters.importers", "convert OpenRLHF/TensorBoard/veRL logs into a run directory"),
    "check": ("rlhf_core.train.check", "print imports, versions and device; writes nothing"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rlhfkit COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'rlhfkit COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rlhfkit: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if os.environ.get("RLHFKIT_DEBUG"):
        return int(importlib.import_module(COMMANDS[name][0]).main(rest) or 0)
    try:
        return int(importlib.import_module(COMMANDS[name][0]).main(rest) or 0)
    except KeyboardInterrupt:
        print(f"rlhfkit {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence: a user sees one line, not a traceback
        text = " ".join(str(err).split())[:200]
        print(f"rlhfkit {name}: internal error ({type(err).__name__}: {text}); please report it "
              "(RLHFKIT_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
