"""``python train.py`` / ``rlhfkit train``: parse flags, train, exit with a code; problems are one line."""
from __future__ import annotations

import sys
from pathlib import Path

from rlhf_core.train.config import parse_args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "rlhfkit train" if Path(sys.argv[0]).name == "rlhfkit" else "train.py"
    cfg = parse_args(argv, prog=prog)
    from rlhf_core.train.runner import RunnerError, train

    try:
        train(cfg)
    except RunnerError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the run directory or a file it needs cannot be written or read
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the run is marked 'interrupted' (resume it with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
