"""runyard-threadpool: an example third-party runyard executor that runs steps on a thread pool.

Nothing is imported here: runyard loads ``runyard_threadpool.plugin`` through its entry
point, and imports ``runyard_threadpool.handler`` only when a run uses the executor.
"""
