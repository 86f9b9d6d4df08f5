"""One live conversation as small parts: transport, listener, reply, perceiver, control, wired by
`session.Session` (see ../../shared/DESIGN.md, "Inside a session")."""

from serve_app.session.config import Handles, SessionSpec
from serve_app.session.session import Session
from serve_app.session.transport import BadOffer

__all__ = ["BadOffer", "Handles", "Session", "SessionSpec"]
