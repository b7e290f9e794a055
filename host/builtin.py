"""The host's own behaviour, registered through the same hooks as any plugin.

The after-download actions ``mark-seen``, ``delete``, ``move`` and ``keep`` call the
session primitives of the same names; a protocol offers an action by listing its name
in ``ProtocolProvider.after_download``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from .hookspecs import hookimpl
from .protocols import AfterDownloadAction, IncomingSession, MessageRef


def _mark_seen(session: IncomingSession, refs: Sequence[MessageRef], _: str | None) -> None:
    session.mark_seen(refs)


def _delete(session: IncomingSession, refs: Sequence[MessageRef], _: str | None) -> None:
    session.delete(refs)


def _move(session: IncomingSession, refs: Sequence[MessageRef], folder: str | None) -> None:
    if not folder:
        raise ValueError("the move action needs a target folder")
    session.move(refs, folder)


def _keep(session: IncomingSession, refs: Sequence[MessageRef], _: str | None) -> None:
    """Leave the messages as they are; the stored keys keep them from coming twice."""


@hookimpl
def register_after_download_actions(register: Callable[[AfterDownloadAction], None]) -> None:
    register(AfterDownloadAction("mark-seen", _mark_seen, "mark the message read"))
    register(AfterDownloadAction("delete", _delete, "remove the message from the server"))
    register(
        AfterDownloadAction(
            "move", _move, "move the message to a folder (created if missing)", takes_argument=True
        )
    )
    register(AfterDownloadAction("keep", _keep, "leave the message on the server unchanged"))
