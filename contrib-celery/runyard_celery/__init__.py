"""runyard-celery: steps on Celery workers.

Skeleton only: this distribution registers no plugin until its issue lands, so
naming `celery` in runyard.yaml still fails with the install hint.
"""
