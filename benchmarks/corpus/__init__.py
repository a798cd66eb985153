"""A corpus of real training runs (the kit's runner, TRL GRPO/RLOO/DPO, a hand-written REINFORCE loop) with
outcome labels computed after the fact: the benchmark of the stability rules (docs/corpus.md)."""
