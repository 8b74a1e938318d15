"""GPU (or CPU) worker pools: the Celery tasks and the engines behind them.
Imports `cord.common`, never `cord.coordinator`."""
