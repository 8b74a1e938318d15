"""Shared by the coordinator and the workers: config, messages, prompts, scoring math,
the Celery app, Redis keys and logging. Imports neither `cord.coordinator` nor
`cord.workers`."""
