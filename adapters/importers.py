"""``rlhfkit import {openrlhf,tensorboard,verl} SOURCE --out RUN``: convert another tool's logs into a kit run.

Exit codes: 0 imported (records that could not be read are warnings on stderr and counts in the summary);
2 bad input, one line: a missing, unreadable or ambiguous source, a source with nothing to import (not
TensorBoard data, no veRL records, no scalars; with ``--follow``: none arrived before ``--max-idle``), an
existing output without ``--overwrite``/``--resume``, or a run ``--resume`` cannot read. A source with
nothing to import creates no run (except with ``--follow``, which creates it while it waits); nothing
already written is removed unless ``--overwrite`` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .convert import SourceError
from .mapping import MAPPERS, VERL_KL_TYPES
from .openrlhf import import_openrlhf
from .ray_timeline import main as ray_timeline_main
from .tb_events import import_tensorboard
from .verl import import_verl


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhfkit import", description="Convert another tool's logs (OpenRLHF, "
                                "TensorBoard, veRL) into a kit run directory.")
    sub = p.add_subparsers(dest="kind", required=True)
    helps = {
        "openrlhf": "OpenRLHF TensorBoard folder (--logger.tensorboard_dir, or one <run_name> folder in it)",
        "tensorboard": "any TensorBoard event folder (scalars; canonical tags kept, others as src/<tag>)",
        "verl": "veRL log: its file logger's JSONL ({\"step\": N, \"data\": {...}} per line) or its console "
                "output ('step:N - key:value - ...' lines, e.g. what `| tee run.log` kept)",
    }
    sub.add_parser("ray-timeline", help="a ray.timeline() trace of an OpenRLHF/veRL job (own options: "
                   "rlhfkit import ray-timeline --help)", add_help=False)
    for kind, help_ in helps.items():
        s = sub.add_parser(kind, help=help_, description=help_)
        s.add_argument("source", help="folder or file to read")
        s.add_argument("--out", help="run directory to write (default: runs/<source name>)")
        s.add_argument("--follow", action="store_true", help="keep converting while the source is written")
        s.add_argument("--poll", type=float, default=2.0, metavar="S", help="seconds between reads with --follow")
        s.add_argument("--max-idle", type=float, default=60.0, metavar="S",
                       help="with --follow: stop after S seconds without new data (default 60)")
        s.add_argument("--overwrite", action="store_true", help="replace an existing run at --out")
        s.add_argument("--resume", action="store_true", help="continue an existing import after its last step")
        s.add_argument("--no-alerts", action="store_true", help="do not run the stability detectors")
        if kind == "openrlhf":
            s.add_argument("--kl-estimator", choices=("k1", "k2", "k3"), default="k1",
                           help="OpenRLHF's --algo.kl.estimator (its train/kl is this estimator; default k1)")
        if kind == "verl":
            s.add_argument("--kl-loss-type", choices=VERL_KL_TYPES, metavar="TYPE",
                           help="the run's actor_rollout_ref.actor.kl_loss_type, the estimator in actor/kl_loss "
                                "(default: as the console log's config says, else veRL's low_var_kl = k3)")
            s.add_argument("--kl-penalty", choices=VERL_KL_TYPES, metavar="TYPE",
                           help="the run's algorithm.kl_penalty, the estimator in actor/reward_kl_penalty "
                                "(critic/kl before 2025-04; default: as the console log says, else kl = k1)")
            s.add_argument("--grad-clip", type=float, metavar="NORM",
                           help="the run's actor_rollout_ref.actor.grad_clip, the threshold its pre-clip "
                                "actor/grad_norm was clipped at (default: as the console log says, else 1.0)")
        if kind == "tensorboard":
            s.add_argument("--mapping", choices=sorted(MAPPERS), default="none",
                           help="key table to apply to the tags (default: none)")
    return p


def main(argv: list[str]) -> int:
    if argv and argv[0] == "ray-timeline":  # a different kind of source (one trace file, no follow/resume)

        return ray_timeline_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.poll <= 0 or args.max_idle < 0:
        print("rlhfkit import: --poll must be > 0 and --max-idle >= 0", file=sys.stderr)
        return 2
    out = args.out or str(Path("runs") / Path(os.path.abspath(args.source)).name)  # abspath: a loop is a name
    common = dict(follow_run=args.follow, interval_s=args.poll, max_idle_s=args.max_idle, overwrite=args.overwrite,
                  resume=args.resume, alerts=not args.no_alerts)
    try:
        if args.kind == "openrlhf":

            summary = import_openrlhf(args.source, out, kl_estimator=args.kl_estimator, **common)
        elif args.kind == "tensorboard":

            summary = import_tensorboard(args.source, out, mapper=MAPPERS[args.mapping], source="tensorboard",
                                         config={"mapping": args.mapping}, **common)
        else:

            summary = import_verl(args.source, out, kl_loss_type=args.kl_loss_type, kl_penalty=args.kl_penalty,
                                  grad_clip=args.grad_clip, **common)
    except (SourceError, FileExistsError, OSError) as err:
        text = f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.filename and err.strerror else err
        print(f"rlhfkit import: {text}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
