"""The run format: what a producer writes into a run directory and the one reader every consumer uses.

Torch-free by contract (tests/test_layers.py imports it in a fresh interpreter and checks that torch stays out).
"""
