"""A first runyard job: fetch a few numbers, square them in parallel steps, add them up.

Run it:  runyard job execute -f examples/hello.py
"""

from runyard import RetryPolicy, job, step


@step(description="Pretend to fetch records from somewhere.")
def fetch() -> list[int]:
    print("fetched 4 records")
    return [1, 2, 3, 4]


@step
def square(records: list[int], index: int) -> int:
    return records[index] ** 2


@step(retry=RetryPolicy(max_retries=2, delay=0.5, backoff=2.0))
def report(squares: list[int]) -> int:
    total = sum(squares)
    print(f"sum of squares: {total}")
    return total


@job(description="Fetch, square each record in its own step, and report the sum.")
def hello():
    records = fetch()
    report([square(records, i) for i in range(4)])
