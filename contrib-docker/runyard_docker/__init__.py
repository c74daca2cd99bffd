"""runyard-docker: a container per step (executor ``docker``) and a container per run
(run launcher ``docker``) on a Docker engine.

`runyard_docker.plugin` is the entry point and imports no Docker library; the executor
(`runyard_docker.executor`) and the launcher (`runyard_docker.launcher`) import the docker
SDK when a run uses them. See docs/backends/docker.md.
"""
