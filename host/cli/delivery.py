"""``mailhost send``, ``mailhost deliver``, ``mailhost queue outgoing`` (placeholder)."""
from __future__ import annotations
