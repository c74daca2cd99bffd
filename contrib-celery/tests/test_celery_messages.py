"""What travels through the broker: JSON only, carrying the step request and nothing else;
a pickled message is refused by runyard's workers."""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery_support import BROKERS, SIGNING_KEY, queue, wait_until
from kombu import Connection
from runyard.plugin import CodePointer, FailureKind, HandlerContext, StepRequest, sign_request, verify_request
from runyard_celery.app import make_app
from runyard_celery.handler import CeleryStepHandler
from runyard_celery.settings import TASK_NAME, CeleryConfig


def request_for(tmp_path: Path, step_key: str, job_name: str, **tags: str) -> StepRequest:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return StepRequest(
        run_id=f"msg-{uuid.uuid4().hex[:8]}",
        step_key=step_key,
        attempt=1,
        attempt_id=uuid.uuid4().hex[:16],
        job_name=job_name,
        code_pointer=CodePointer(module="celery_test_jobs"),
        output_store=str(tmp_path / "outputs"),
        inputs={},
        run_config={"scratch": str(scratch)},
        tags=tags,
    )


def raw_messages(broker: str, name: str) -> list[dict[str, Any]]:
    """The messages waiting in queue ``name``, as the broker holds them: content type,
    properties and body bytes. Removes them (and the queue)."""
    if broker == "redis":
        client = redis.Redis.from_url(BROKERS["redis"]["broker"])
        found = []
        # kombu keeps one list per priority step: NAME, then NAME\x06\x16<priority>.
        for key in client.keys(name.encode() + b"*"):
            for raw in client.lrange(key, 0, -1):
                envelope = json.loads(raw)  # the envelope itself must be JSON
                body = envelope["body"]
                if envelope["properties"].get("body_encoding") == "base64":
                    body = base64.b64decode(body)
                found.append({"content_type": envelope["content-type"], "priority_key": key,
                              "properties": envelope["properties"], "body": body})
            client.delete(key)
        return found
    with Connection(BROKERS["rabbitmq"]["broker"]) as conn:
        channel = conn.channel()
        found = []
        while (msg := channel.basic_get(name, no_ack=True)) is not None:
            found.append({"content_type": msg.content_type, "properties": msg.properties, "body": msg.body})
        channel.queue_delete(name)
        return found


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_task_message_is_json_and_carries_only_the_step_request(tmp_path: Path, broker: str) -> None:
    nobody = queue(f"json-{broker}")  # nobody consumes it: the message stays for us to read
    cfg = CeleryConfig(**BROKERS[broker], default_queue=nobody, queue_timeout=60.0)
    handler = CeleryStepHandler(cfg, HandlerContext(run_id="r", instance_home=None,
                                                    output_store=str(tmp_path), max_concurrent=1))
    handler.setup()
    request = request_for(tmp_path, "slow_start", "slow_job", **{"celery/priority": "7"})
    try:
        handle = handler.launch(request)
        time.sleep(0.5)
        messages = raw_messages(broker, nobody)
        handler.terminate(handle, FailureKind.CANCELED)
    finally:
        handler.teardown()
    assert len(messages) == 1
    msg = messages[0]
    assert msg["content_type"] == "application/json"
    args, kwargs, _embed = json.loads(msg["body"])
    assert args == [sign_request(request, SIGNING_KEY.encode())] and kwargs == {}
    assert verify_request(args[0], SIGNING_KEY.encode()) == request
    # runyard's priority 7 (0 lowest .. 9 highest) as each broker orders it.
    if broker == "redis":
        assert msg["properties"]["priority"] == 2 and msg["priority_key"].endswith(b"\x06\x162")
    else:
        assert msg["properties"]["priority"] == 7


def test_pickled_message_is_refused_by_the_worker(tmp_path: Path, session_workers: Any) -> None:
    worker = session_workers["redis"]
    main = queue("redis-main")
    request = request_for(tmp_path, "slow_start", "slow_job")
    marker = Path(request.run_config["scratch"], "slow_start.pid")
    pickler = Celery("pickler", broker=BROKERS["redis"]["broker"], backend=BROKERS["redis"]["backend"],
                     set_as_current=False)
    pickler.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    try:
        pickled_id = f"pickled-{uuid.uuid4().hex}"
        pickler.send_task(TASK_NAME, args=[sign_request(request, SIGNING_KEY.encode())], queue=main,
                          task_id=pickled_id, serializer="pickle")
        # The worker logs the refused body (where the run id shows) and the reason.
        wait_until(lambda: request.run_id in worker.log.read_text(errors="replace"), 20,
                   "the worker to see the pickled message")
        time.sleep(1)
        assert "ContentDisallowed: Refusing to deserialize untrusted content of type pickle" in worker.log.read_text(
            errors="replace")
        assert not marker.exists(), "the worker ran a step from a pickled message"
        assert pickler.AsyncResult(pickled_id).state == "PENDING"
    finally:
        pickler.close()
    # The same request as JSON runs: the refusal was about the serializer, nothing else.
    app = make_app(broker=BROKERS["redis"]["broker"], backend=BROKERS["redis"]["backend"])
    try:
        result = app.send_task(TASK_NAME, args=[sign_request(request, SIGNING_KEY.encode())], queue=main)
        wait_until(lambda: result.state == "SUCCESS", 30, "the JSON task to succeed")
        assert result.result["events"][-1]["type"] == "STEP_SUCCESS"
        assert marker.exists()
    finally:
        app.close()
