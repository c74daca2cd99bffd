"""runyard-docker: a container per step and a container per run on Docker.

Skeleton only: this distribution registers no plugin until its issue lands, so
naming `docker` in runyard.yaml still fails with the install hint.
"""
