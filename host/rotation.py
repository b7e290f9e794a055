"""Rotating the secret key: a new key, every stored secret re-encrypted under it.

The way Airflow's ``rotate-fernet-key`` and Django's ``SECRET_KEY_FALLBACKS`` do it, with
:class:`~cryptography.fernet.MultiFernet`: the key file (or ``$MAILHOST_SECRET_KEY``)
holds several keys, the first encrypts and all decrypt. :func:`rotate` then

1. takes the store's write lock (one rotation at a time) and checks that the current
   keys open every stored secret: a wrong key changes nothing;
2. writes ``new`` before the current keys into the key file, atomically and durably
   (:func:`~mailhost.secrets.write_key_file`);
3. re-encrypts every secret under the new key in one transaction.

A crash (SIGKILL, power cut) at any instant leaves a store whose every secret opens with
a key on disk: before 2 the store and the file are as they were; between 2 and the commit
of 3 the file holds the new key and the old ones, and the store is under the old; after
it, under the new. :func:`drop_old` then removes the old keys once no secret needs them.

``$MAILHOST_SECRET_KEY`` cannot be written by mailhost: there the admin puts the new key
first (``NEW,OLD``) where the variable comes from, and :func:`rotate` re-encrypts under
it, so that the new key is kept by the admin before any secret depends on it.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from .errors import ConfigError
from .secrets import KEY_ENV, KeySource, write_key_file
from .store import ENCRYPTED_COLUMNS

if TYPE_CHECKING:
    from .app import Mailhost

__all__ = ["RotationReport", "drop_old", "rotate"]

#: What each encrypted column holds, in words for errors.
KINDS: Final = {
    "incoming_passwords": "incoming connection password",
    "outgoing_passwords": "outgoing connection password",
    "oauth_client_secrets": "OAuth2 client secret",
    "oauth_tokens": "OAuth2 token set",
    "certificate_keys": "certificate private key",
    "decrypted_messages": "decrypted incoming message",
}

_BATCH = 500  # rows read at a time: decrypted messages can be large

NEW_KEY_HINT: Final = ('python -c "from cryptography.fernet import Fernet; '
                       'print(Fernet.generate_key().decode())"')


@dataclass
class RotationReport:
    """What a rotation did: how many secrets of each kind it re-encrypted (never a secret
    or a key), how many keys the source holds now, and what the admin does next."""

    source: str
    keys: int
    reencrypted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENCRYPTED_COLUMNS, 0))
    dropped: int = 0
    next: str = ""

    def add(self, counts: dict[str, int]) -> None:
        for kind, n in counts.items():
            self.reencrypted[kind] += n

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"source": self.source, "keys": self.keys, "reencrypted": dict(self.reencrypted),
                "total": sum(self.reencrypted.values()), "dropped_keys": self.dropped, "next": self.next}


def rotate(host: Mailhost, drop: bool = False) -> RotationReport:
    """Put a new key first and re-encrypt every stored secret under it; with ``drop``,
    then remove the old keys (:func:`drop_old`). From ``$MAILHOST_SECRET_KEY``, whose
    first key the admin set, re-encrypt under that one."""
    source = KeySource(host.config.key_file)
    if source.env and drop:
        raise ConfigError(f"--drop-old cannot edit ${KEY_ENV}: rotate first, then remove the old keys from it "
                          "yourself once every mailhost process runs with the new one first")
    _check_writable(source)
    with host.session() as s:
        _lock(s)
        current = source.read()  # read under the lock: another rotation may just have written it
        if source.env and len(current) == 1:
            raise ConfigError(
                f"${KEY_ENV} holds one key and mailhost cannot write the environment: put a new key before it, "
                f"comma-separated (NEW,OLD; make one with {NEW_KEY_HINT}) where the variable is set, then run "
                "`mailhost secrets rotate` again")
        _check_opens(s, current, source)
        keys = current if source.env else [Fernet.generate_key(), *current]
        if not source.env:
            try:
                write_key_file(source.key_file, keys)
            except OSError as exc:
                raise _unwritable(source, exc) from None
        report = RotationReport(source.where, len(keys))
        report.add(_reencrypt(s, keys))
    if drop:
        dropped = drop_old(host)
        report.add(dropped.reencrypted)
        report.keys, report.dropped, report.next = dropped.keys, dropped.dropped, dropped.next
    elif source.env:
        report.next = (f"every secret is under the first key of ${KEY_ENV} now; once every mailhost process runs "
                       "with that key first, run `mailhost secrets drop-old`, then set the variable to its first "
                       "key alone")
    else:
        report.next = (f"{source.key_file} holds the new key first and the {len(current)} old one(s) after it: copy it "
                       "to every other machine that shares this store, if any, then run `mailhost secrets drop-old`")
    return report


def drop_old(host: Mailhost) -> RotationReport:
    """Re-encrypt what still needs an old key under the first one, then remove the old keys
    from the key file (from ``$MAILHOST_SECRET_KEY``: say that the admin can)."""
    source = KeySource(host.config.key_file)
    _check_writable(source)
    with host.session() as s:
        _lock(s)
        keys = source.read()
        report = RotationReport(source.where, len(keys))
        if len(keys) == 1:
            report.next = f"{source.where} holds one key: there is no old key to drop"
            return report
        _check_opens(s, keys, source)
        report.add(_reencrypt(s, keys))
    if source.env:
        report.next = (f"no stored secret needs the {len(keys) - 1} old key(s) of ${KEY_ENV} any more: set it to its "
                       "first key alone, then restart every mailhost process")
        return report
    try:
        write_key_file(source.key_file, keys[:1])
    except OSError as exc:
        raise _unwritable(source, exc) from None
    # A process that read the file before it changed may have written a secret under an
    # old key meanwhile: this pass, with the old keys still in memory, moves it too.
    with host.session() as s:
        _lock(s)
        report.add(_reencrypt(s, keys))
    report.keys, report.dropped = 1, len(keys) - 1
    report.next = f"{source.key_file} holds the new key alone; keep a copy of it: stored secrets need it"
    return report


# ---------------------------------------------------------------------------------------


def _lock(s: Session) -> None:
    """Take the store's write lock for the transaction (SQLite: the whole store;
    PostgreSQL: the schema's version row): two rotations never interleave, which could
    leave a key file without the key that a secret was re-encrypted under."""
    s.execute(text("UPDATE alembic_version SET version_num = version_num"))


def _check_writable(source: KeySource) -> None:
    """Refuse, before anything changes, a key file this user cannot replace."""
    if source.env:
        return
    path = source.key_file.resolve()
    for what in (path, path.parent):
        if what.exists() and not os.access(what, os.W_OK):
            # os.access says no but not why: a read-only mount needs another fix than a chown
            if os.statvfs(what).f_flag & os.ST_RDONLY:
                raise _unwritable(source, OSError(errno.EROFS, os.strerror(errno.EROFS)))
            raise _unwritable(source, PermissionError(errno.EACCES, os.strerror(errno.EACCES)))


def _unwritable(source: KeySource, exc: OSError) -> ConfigError:
    if exc.errno == errno.EROFS:
        fix = ("the key file's file system is mounted read-only: rotate where the file can be written and copy "
               "it here, or keep the keys in $MAILHOST_SECRET_KEY")
    else:
        fix = "rotation writes the new key into it, so make it and its folder writable for this user"
    return ConfigError(
        f"cannot write the secret key file {source.key_file} ({exc.strerror or exc}): {fix}; nothing was changed")


def _rows(s: Session, column: Any) -> Iterator[tuple[int, bytes]]:
    """(id, ciphertext) of every row with a secret in ``column``, a batch at a time."""
    model = column.class_
    last = 0
    while True:
        batch = s.execute(select(model.id, column).where(column.is_not(None), model.id > last)
                          .order_by(model.id).limit(_BATCH)).all()
        for row_id, token in batch:
            yield row_id, bytes(token)
        if len(batch) < _BATCH:
            return
        last = batch[-1][0]


def _check_opens(s: Session, keys: list[bytes], source: KeySource) -> None:
    """Raise ConfigError unless ``keys`` open every stored secret."""
    opener = MultiFernet([Fernet(k) for k in keys])
    for kind, column in ENCRYPTED_COLUMNS.items():
        for row_id, token in _rows(s, column):
            try:
                opener.decrypt(token)
            except InvalidToken:
                raise ConfigError(
                    f"a stored {KINDS[kind]} (row {row_id} of {column.class_.__tablename__}) cannot be decrypted "
                    f"with the key(s) in {source.where}: restore the key that encrypted it before rotating; "
                    "nothing was changed") from None


def _reencrypt(s: Session, keys: list[bytes]) -> dict[str, int]:
    """Re-encrypt every secret that the first of ``keys`` does not open under it; returns
    how many of each kind. Each write is a compare-and-set on the ciphertext, so that a
    secret another process changed meanwhile (a refreshed token) is re-read, not lost."""
    first = Fernet(keys[0])
    rotator = MultiFernet([first, *(Fernet(k) for k in keys[1:])])
    counts = dict.fromkeys(ENCRYPTED_COLUMNS, 0)
    for kind, column in ENCRYPTED_COLUMNS.items():
        model = column.class_
        # Rotation changes no setting: a row's updated_at (shown, and compared by the
        # OAuth2 token writes) stays as it was.
        keep = {"updated_at": model.updated_at} if hasattr(model, "updated_at") else {}
        for row_id, token in _rows(s, column):
            while token is not None:
                try:
                    first.decrypt(token)
                    break  # already under the first key
                except InvalidToken:
                    pass
                try:
                    fresh = rotator.rotate(token)
                except InvalidToken:  # written meanwhile by a process with other keys
                    raise ConfigError(f"a stored {KINDS[kind]} (row {row_id} of {model.__tablename__}) was just "
                                      "written under a key this rotation does not have: give every mailhost "
                                      "process the same key file, then rotate again; nothing was changed") from None
                written = s.execute(
                    update(model).where(model.id == row_id, column == token)
                    .values({column.key: fresh, **keep})
                    .execution_options(synchronize_session=False)).rowcount
                if written:
                    counts[kind] += 1
                    break
                token = s.scalar(select(column).where(model.id == row_id))  # changed meanwhile: again
                token = bytes(token) if token is not None else None
    return counts
