"""runyard-k8s: a Kubernetes Job per step (executor ``k8s``) and per run (run launcher ``k8s``).

See docs/backends/k8s.md. The plugin module (`runyard_k8s.plugin`) imports no Kubernetes
client; `runyard_k8s.executor.K8sStepHandler` is the step handler's public entry point.
"""
