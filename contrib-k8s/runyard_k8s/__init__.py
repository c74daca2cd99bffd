"""runyard-k8s: a Kubernetes Job per step and per run.

Skeleton only: this distribution registers no plugin until its issue lands, so
naming `k8s` in runyard.yaml still fails with the install hint.
"""
