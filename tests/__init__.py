"""runyard's own test suite (a package, so executor specs in tests can name ``tests.<module>:Class``)."""
