"""runyard-dask: steps on a Dask cluster.

Skeleton only: this distribution registers no plugin until its issue lands, so
naming `dask` in runyard.yaml still fails with the install hint.
"""
