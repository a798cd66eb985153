"""``rlhfkit diagnose RUN_DIR``: run the stability detectors over a run and gate CI on critical alerts.

Exit codes: 0 no critical alert, 1 at least one critical alert, 2 bad input (missing directory, not a
run, bad config). Reader problems (torn or malformed lines) are printed to stderr as warnings.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rlhf_core.runformat.keys import sanitize
from rlhf_core.runformat.run_reader import Run, RunError, summarize
from rlhf_core.stability.analysis import RunAnalysis
from rlhf_core.stability.detectors import Alert, DetectorConfig, rule_names

# flag -> config field, for the settings people change most
_FLAGS = {
    "--kl-budget": ("kl_budget", float, "KL budget in nats/token: a warning above it, critical when it stays "
                                        "above it 2 steps, an info note above half of it (default 1.0, or the "
                                        "run's own kl_budget)"),
    "--max-grad-norm": ("max_grad_norm", float, "clip norm for the frequent-clipping note grad_clipping "
                                                "(default: the run's grad/max_norm)"),
    "--spike-sigma": ("spike_sigma", float, "robust sigmas above the window median that count as a spike "
                                            "(default 6)"),
    "--kl-z": ("kl_z", float, "z-score above the KL trend that counts as an explosion (default 4)"),
    "--rearm-steps": ("rearm_steps", int, "healthy steps before a rule may fire again (default 50)"),
    "--straggler-factor": ("straggler_factor", float, "slow-rank factor over the other ranks' median (default 1.5)"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlhfkit diagnose", description="Run the stability detectors over a run directory. "
        "Exit 1 when a critical alert exists, 2 on bad input.")
    p.add_argument("run_dir", help="run directory (holds meta.json)")
    p.add_argument("--json", action="store_true", help="print the alerts as a JSON list")
    p.add_argument("--config", metavar="FILE.json", help="detector settings (any DetectorConfig field)")
    for flag, (field, typ, help_) in _FLAGS.items():
        p.add_argument(flag, dest=field, type=typ, default=None, help=help_)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other detector setting; VALUE is JSON (e.g. --set critic_steps=40)")
    p.add_argument("--disable", action="append", default=[], metavar="RULE",
                   help=f"skip a rule (repeatable): {', '.join(rule_names())}")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The user's settings: --config file < --set < named flags, checked (every error is a one-line ValueError).

    They go on top of the run's own settings (its KL budget, clip norm, producer), as everywhere else."""
    values: dict[str, Any] = {}
    if args.config:
        try:
            loaded = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read config {args.config}: {err}") from err
        if not isinstance(loaded, dict):
            raise ValueError(f"config {args.config} must hold a JSON object")
        values.update(loaded)
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            values[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            values[key.strip()] = raw
    for field, _, _ in _FLAGS.values():
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    if args.disable:
        values["disabled_rules"] = list(values.get("disabled_rules", [])) + args.disable
    DetectorConfig.from_any(values)
    return values


def _alert_json(alert: Alert) -> dict[str, Any]:
    out = alert.as_dict()
    out["evidence"] = sanitize(out["evidence"])[0]
    return out


def _print_human(run: Run, status: str, alerts: list[Alert], steps: int) -> None:
    for a in alerts:
        rank = f" rank {a.rank}" if a.rank is not None else ""
        print(f"{a.severity.upper():8}  {a.rule:22} step {a.step:<7}{rank}  {a.message}")
        print(f"{'':10}suggestion: {a.suggestion}")
    counts = {sev: sum(a.severity == sev for a in alerts) for sev in ("critical", "warning", "info")}
    verdict = "no alerts" if not alerts else (
        f"{len(alerts)} alert(s): " + ", ".join(f"{n} {sev}" for sev, n in counts.items() if n or sev != "info"))
    print(f"{run.run_id}: {verdict} over {steps} steps (status {status})")


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one-line usage error
        return int(exc.code or 0)
    try:
        overrides = _overrides(args)
        run = Run(args.run_dir)
        analysis = RunAnalysis(run, overrides)
        alerts = analysis.alerts()
        problems = analysis.problems()
        status = run.status_line()
    except (ValueError, RunError, OSError) as err:
        print(f"rlhfkit diagnose: {err}", file=sys.stderr)
        return 2
    for problem in summarize(problems):  # at most five lines and a count: 1 MB of garbage is not 4,000 warnings
        print(f"warning: {problem}", file=sys.stderr)
    code = 1 if any(a.severity == "critical" for a in alerts) else 0
    try:
        if args.json:
            print(json.dumps([_alert_json(a) for a in alerts], indent=2, allow_nan=False))
        else:
            _print_human(run, status, alerts, analysis.records_seen)
        sys.stdout.flush()
    except BrokenPipeError:  # `rlhfkit diagnose RUN | head`: the reader left, the verdict still stands
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
