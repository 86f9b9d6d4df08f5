"""Presence's Serve application: REST ingress, session hosts, the live session's parts, web client."""
