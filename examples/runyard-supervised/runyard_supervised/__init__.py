"""runyard-supervised: an example third-party run launcher (see README.md)."""
