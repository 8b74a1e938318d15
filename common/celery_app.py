"""The one Celery app both sides use. The coordinator sends tasks by name and never
imports the workers; the workers register the task bodies on this app.

Settings follow docs/method.md ("Celery on preemptible workers"): JSON only, acks
late, prefetch 1, a visibility timeout longer than any task, results not stored (they go
to a Redis Stream), task events only while Flower watches.
"""

from __future__ import annotations

from celery import Celery

from cord.common.config import RunConfig
from cord.common.redisconn import celery_broker


def make_celery(cfg: RunConfig) -> Celery:
    broker, sentinel = celery_broker(cfg.redis_url)  # a Sentinel URL: Kombu's own form
    app = Celery("cord", broker=broker, set_as_current=False)
    transport = {"visibility_timeout": cfg.reliability.visibility_timeout_s, **sentinel}
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # A send during a Redis restart waits for it (about a minute) instead of failing
        # after kombu's default three quick tries.
        task_publish_retry_policy={
            "max_retries": 30,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 2.0,
        },
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # Off until Flower turns them on (it sends enable_events to every worker, again
        # every few seconds): publishing three events per task was a third of a tiny
        # model's worker time (make bench), and nothing else reads them.
        worker_send_task_events=False,
        # Flower follows tasks by the workers' events; a "sent" event per task from the
        # coordinator was a sixth of its CPU per dispatched item (make bench).
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_default_queue=f"{cfg.namespace}.default",
    )
    return app
