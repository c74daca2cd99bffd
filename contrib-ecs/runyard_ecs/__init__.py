"""runyard-ecs: each run's worker (run launcher ``ecs``) and each step attempt (executor
``ecs``) as an Amazon ECS task. See docs/backends/ecs.md."""
