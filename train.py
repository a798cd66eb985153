"""Train the thin PPO runner: ``python train.py --help`` (the same as ``rlhfkit train``)."""
import sys

from rlhf_core.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
