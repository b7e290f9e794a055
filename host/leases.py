"""Who holds a lease: worker ids, and telling that a holder on this machine died.

Both pipelines lease work in the store (a mailbox being downloaded, messages being
sent). A lease ends when it expires; one held by a process on this machine (same PID
namespace) that no longer runs ends at once, so a crashed ``mailhost fetch`` or
``deliver`` never blocks the next one for the rest of its lease.
"""
from __future__ import annotations

import os
import socket
import uuid

__all__ = ["holder_is_gone", "worker_id"]


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        return "-"


def worker_id() -> str:
    """host:pid-namespace:pid:random — enough to tell, on this host, that a worker died."""
    return f"{socket.gethostname()}:{_pid_namespace()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_is_gone(owner: str) -> bool:
    """Whether ``owner`` was a process on this host (same PID namespace) that is gone.

    Only a certain "gone" counts: another host, another namespace, or a PID that runs
    (perhaps reused) all wait for the lease to expire instead.
    """
    parts = owner.split("/", 1)[0].rsplit(":", 3)
    if len(parts) != 4:
        return False
    hostname, namespace, pid, _ = parts
    if hostname != socket.gethostname() or namespace == "-" or namespace != _pid_namespace():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False
