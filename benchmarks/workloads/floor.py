"""The floor: plain Python calling the same functions, no orchestration at all.

(time - floor) / steps is what each system's per-step overhead is computed from.
"""

from __future__ import annotations

from workloads.common import Kind, measure, parse_args


def source() -> int:
    return 1


def inc(x: int) -> int:
    return x + 1


def total(xs: list[int]) -> int:
    return sum(xs)


def run(kind: Kind, n: int) -> int:
    if kind == "chain":
        x = source()
        for _ in range(n - 1):
            x = inc(x)
        return x
    s = source()
    # Materialise the list like the orchestrators do before fan-in.
    return total([inc(s) for _ in range(n)])


def main() -> None:
    kind, n = parse_args("floor")
    measure("floor", kind, n, run)


if __name__ == "__main__":
    main()
