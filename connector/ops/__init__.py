"""The operator's side: configuration, pre-flight checks, status, metrics, logs and server counts."""
