"""Everything that measures the product and is never imported by it: corpora and simulated
conversations, verification / identification / diarization evaluations and their baselines, ROC and
calibration fitting, benchmarks and the load test. Installed with the `[eval]` extra."""
