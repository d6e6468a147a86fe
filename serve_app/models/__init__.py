"""Model deployments, one family per module."""
