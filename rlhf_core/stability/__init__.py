"""The stability analysis of a run: the rules, the engine that runs them, and the one analysis every view uses.

Reads metrics through the run format only; torch-free like it.
"""
