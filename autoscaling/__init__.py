"""Autoscaling policy and capacity math (session counts + p95 latency). See issue 4."""
