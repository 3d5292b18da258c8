"""Evaluation: LongBench-format tasks, their metrics, and a small offline task set."""
