"""runyard-dask: each step of a run as a task on a Dask cluster, or on dask's local schedulers.

`runyard_dask.plugin` (the entry point) declares the executor and imports neither dask nor
distributed; `runyard_dask.handler` (the engine side) and `runyard_dask.remote` (what runs
inside a Dask worker) are imported only when a run uses the executor.
"""
