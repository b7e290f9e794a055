"""The outgoing pipeline (placeholder: written with the SMTP plugin)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import Mailhost


class Outgoing:
    """The outgoing queue and delivery passes."""

    def __init__(self, host: Mailhost) -> None:
        self.host = host

    def deliver(self, sessions: int = 1) -> Any:
        """One delivery pass over the outgoing queue."""
        return []
