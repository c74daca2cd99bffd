"""`runyard daemon`: one long-running process per instance that monitors runs, launches
queued runs, retries failed runs and enforces run timeouts (see docs/daemon.md).

`settings` holds the instance sections it reads; `queue` the queue's order and limits;
`service` the daemon itself (lease and loops); `log` its one-line-per-action log.
"""
