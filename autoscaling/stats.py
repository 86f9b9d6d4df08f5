"""Names of the stats replicas report through `record_autoscaling_stats` and the policies read."""

SESSIONS = "sessions"  # SessionHost: live sessions on the replica
REPLY_P95_MS = "reply_p95_ms"  # SessionHost: speech end -> first reply audio sent, p95 over its window
FRAME_P95_MS = "frame_p95_ms"  # SessionHost: avatar render time per frame, p95
IN_FLIGHT = "in_flight"  # model deployments: calls being served now
P95_SERVICE_MS = "p95_service_ms"  # model deployments: service time per call, p95
