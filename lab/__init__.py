"""The lab: a task family with checkable answers and tiny HF models built (and, later,
trained) here on the CPU, so the whole method runs on a laptop."""
