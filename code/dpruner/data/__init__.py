"""Data: the prepared files, JSONL readers, calibration windows, domain training and test sets."""
