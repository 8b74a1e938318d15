"""The coordinator: holds the beam state of every problem in flight, dispatches work to
the pools by task name, gathers results from a Redis Stream, writes JSONL.
Imports `cord.common`, never `cord.workers`."""
