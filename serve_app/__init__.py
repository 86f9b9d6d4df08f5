"""Presence's Serve application: REST ingress, session hosts, per-session pipeline, web client."""
