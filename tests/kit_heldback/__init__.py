"""Held-back broken executors: each must fail the conformance kit (see tests/test_kit_heldback.py)."""
