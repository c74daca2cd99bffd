"""runyard-celery: each step of a run as a Celery task on Celery workers.

The plugin module (`runyard_celery.plugin`) registers the ``celery`` executor and the
``runyard celery worker`` command without importing Celery; see docs/backends/celery.md.
"""
