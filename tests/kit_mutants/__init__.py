"""A correct subprocess step handler and deliberately broken copies of it (mutants), to
prove that the conformance kit fails broken executors (tests/test_kit_mutants.py)."""
