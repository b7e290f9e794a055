"""Rotating the secret key: every secret re-encrypted under a new key, crash-safe at any
instant (SIGKILL), followed by a running service, refused cleanly on bad input."""
from __future__ import annotations

import json
import logging
import os
import random
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import select, update

from mailhost import Mailhost
from mailhost.connections import ConnectionSpec
from mailhost.protocols import Direction
from mailhost.rotation import drop_old, rotate
from mailhost.service import Service
from mailhost.store import ENCRYPTED_COLUMNS, IncomingConnection, IncomingItem

from .helpers import kill_when, run_cli
from .servers.fixtures import in_ci
from .servers.idp import IdentityProvider
from .test_oauth import microsoft
from .test_smime import PASSWORD, Person, make_person, smime_encrypt

PASSWORDS = {"desk": "in-Tr0ub4dor&3", "out": "out-correct-horse"}


def key_lines(host: Mailhost) -> list[bytes]:
    return host.config.key_file.read_bytes().split()


def secrets_of(host: Mailhost) -> dict[tuple[str, int], bytes]:
    """Every stored ciphertext, by (kind, row id)."""
    found: dict[tuple[str, int], bytes] = {}
    with host.session() as s:
        for kind, column in ENCRYPTED_COLUMNS.items():
            for row_id, token in s.execute(select(column.class_.id, column).where(column.is_not(None))):
                found[kind, row_id] = bytes(token)
    return found


def opened(host: Mailhost, keys: list[bytes]) -> dict[tuple[str, int], bytes]:
    """Every stored secret in clear, opened with ``keys`` alone (InvalidToken if one does not open)."""
    opener = MultiFernet([Fernet(k) for k in keys])
    return {where: opener.decrypt(token) for where, token in secrets_of(host).items()}


@pytest.fixture(scope="module")
def alice(tmp_path_factory: pytest.TempPathFactory) -> Person:
    """A certificate and key for S/MIME mail."""
    return make_person(tmp_path_factory.mktemp("people"), "alice")


@pytest.fixture
def stocked(mh_any: Mailhost, tmh_factory: Callable[[Mailhost], Mailhost], idp: IdentityProvider,
            alice: Person, tmp_path: Path) -> Mailhost:
    """An installation (SQLite, then PostgreSQL) with one secret of every kind, each put
    there the way mailhost does it: connection passwords, an OAuth2 client secret and its
    tokens, a certificate's private key, and a message decrypted at ingest."""
    host = tmh_factory(mh_any)
    host.certificates.add("alice", alice.p12, password=PASSWORD)
    box = tmp_path / "box"
    box.mkdir()
    (box / "secret.eml").write_bytes(smime_encrypt(alice, subject="for alice"))
    host.connections.add(Direction.INCOMING, ConnectionSpec(
        name="desk", protocol="dir", folder=str(box), username="u", password=PASSWORDS["desk"], certificates=["alice"]))
    host.connections.add(Direction.OUTGOING, ConnectionSpec(
        name="out", protocol="dir", host="box", username="u", password=PASSWORDS["out"]))
    cred = microsoft(host, idp, flow="client-credentials")
    host.oauth.access_token(cred.id, "any@example.org")  # stores the token set
    [report] = host.incoming.fetch(["desk"])
    assert report.stored == 1 and not report.error
    assert {kind for kind, _ in secrets_of(host)} == set(ENCRYPTED_COLUMNS)
    return host


def test_several_keys_the_first_encrypts_every_one_decrypts(tmp_path: Path) -> None:
    """A key file of several keys (blank lines and CRLF allowed) and a comma-separated
    variable: what any key encrypted opens, and a new secret is under the first key."""
    from mailhost.secrets import Vault

    new, old = Fernet.generate_key(), Fernet.generate_key()
    key_file = tmp_path / "mailhost.key"
    key_file.write_bytes(new + b"\r\n\r\n" + old + b"\r\n")
    vault = Vault.from_env_or_file(key_file)
    assert vault.decrypt(Fernet(old).encrypt(b"from before")) == "from before"
    assert Fernet(new).decrypt(vault.encrypt("from now on")) == b"from now on"
    assert Vault([new, old]).decrypt(Fernet(old).encrypt(b"x")) == "x"


def test_rotate_reencrypts_every_secret_and_drop_old_removes_the_old_key(stocked: Mailhost, idp: IdentityProvider) -> None:
    """rotate: the key file holds the new key first and the old one after it, every secret
    of every kind is under the new key alone with its plaintext unchanged, and the report
    counts them per kind; drop-old leaves the new key alone. The installation opened
    before (its vault read the old key) goes on working throughout."""
    old = key_lines(stocked)
    before = opened(stocked, old)
    report = rotate(stocked)
    assert report.reencrypted == dict.fromkeys(ENCRYPTED_COLUMNS, 1) and report.keys == 2
    keys = key_lines(stocked)
    assert len(keys) == 2 and keys[1:] == old
    assert stat.S_IMODE(stocked.config.key_file.stat().st_mode) == 0o600
    assert opened(stocked, keys[:1]) == before
    with pytest.raises(InvalidToken):
        opened(stocked, old)
    again = drop_old(stocked)
    assert again.dropped == 1 and sum(again.reencrypted.values()) == 0
    assert key_lines(stocked) == keys[:1] and opened(stocked, keys[:1]) == before
    # The installation whose vault was made with the old key follows the key file.
    conn = stocked.connections.get(Direction.INCOMING, "desk")
    assert stocked.connections.settings(Direction.INCOMING, conn).password == PASSWORDS["desk"]
    cred = stocked.oauth.get("m365")
    assert idp.introspect(stocked.oauth.access_token(cred.id, "any@example.org"))["client_id"] == "client-m365"
    [item] = stocked.incoming.items()
    assert stocked.incoming.item(item.id).decrypted == before["decrypted_messages", item.id]
    assert not list(stocked.config.key_file.parent.glob(".*.new"))


def test_drop_old_first_moves_what_still_needs_an_old_key(stocked: Mailhost) -> None:
    """A secret written under the old key after the rotation (by a process that had not
    read the new key file yet) is re-encrypted under the new key before the old one goes."""
    old = key_lines(stocked)
    rotate(stocked)
    with stocked.session() as s:
        s.execute(update(IncomingConnection).values(password_enc=Fernet(old[0]).encrypt(b"late")))
    report = drop_old(stocked)
    assert report.reencrypted["incoming_passwords"] == 1 and report.dropped == 1
    [new] = key_lines(stocked)
    assert opened(stocked, [new])["incoming_passwords", stocked.connections.get(Direction.INCOMING, "desk").id] == b"late"


def test_cli_rotate_json_reports_counts_and_never_a_key(home: Path, plugin_env: dict[str, str]) -> None:
    """`secrets rotate --json`: one JSON object, counts per kind, no key material in any output."""
    env = {**plugin_env, "MAILHOST_LOAD_PLUGINS": "testplugin", "PW": PASSWORDS["out"]}
    assert run_cli("outgoing", "add", "out", "--protocol", "dir", "--host", "box", "--username", "u",
                   "--password-env", "PW", env=env, cwd=home).returncode == 0
    old = (home / "mailhost.key").read_text().split()
    out = run_cli("secrets", "rotate", "--json", env=env, cwd=home)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["reencrypted"]["outgoing_passwords"] == 1 and report["total"] == 1 and report["keys"] == 2
    assert "secrets drop-old" in report["next"]
    out2 = run_cli("secrets", "drop-old", env=env, cwd=home)
    assert out2.returncode == 0 and "dropped 1 old key(s)" in out2.stderr, out2.stderr
    keys = old + (home / "mailhost.key").read_text().split()
    for text in (out.stdout, out.stderr, out2.stdout, out2.stderr):
        assert not any(k in text for k in keys)
    assert run_cli("outgoing", "test", "out", env=env, cwd=home).returncode == 0


# ---------------------------------------------------------------------------------------
# Crash safety
# ---------------------------------------------------------------------------------------


def test_sigkill_at_any_instant_leaves_every_secret_under_a_key_on_disk(
        stocked: Mailhost, plugin_env: dict[str, str]) -> None:
    """`secrets rotate` (and `--drop-old`) killed with SIGKILL again and again, before,
    while and after it writes the key file: after each kill the key file is whole (0600,
    only valid keys), every secret opens with its keys and holds what it held, and the
    connections work (`incoming test`, `outgoing test`). Many decrypted messages make
    the re-encryption long enough to be killed in."""
    host = stocked
    with host.session() as s:
        for n in range(3000):
            s.add(IncomingItem(connection_name="desk", fingerprint=f"bulk-{n}", raw=b"x",
                               decrypted=host.vault.encrypt(b"message %d " % n * 40)))
    before = opened(host, key_lines(host))
    env = {**plugin_env, "MAILHOST_LOAD_PLUGINS": "testplugin"}
    rng = random.Random(int(os.environ.get("MAILHOST_TEST_SEED", "20261121")))
    key_file = host.config.key_file
    landed = dict.fromkeys(("before the key file", "in the re-encryption", "after the commit"), 0)
    for attempt in range(8):
        stamp = key_file.stat().st_mtime_ns, key_file.stat().st_ino
        args = ["secrets", "rotate", *(["--drop-old"] if attempt % 3 == 2 else [])]
        proc = subprocess.Popen([sys.executable, "-m", "mailhost", *args], env={**os.environ, **env},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if attempt % 2:  # just after the key file changed: inside the re-encryption's transaction
            def ready() -> bool:
                st = key_file.stat()
                return (st.st_mtime_ns, st.st_ino) != stamp
            killed = kill_when(proc, ready, then=rng.uniform(0.0, 0.3))
        else:  # anywhere: start-up, the check of the current keys, the key file, the re-encryption
            at = time.monotonic() + rng.uniform(0.05, 1.2)
            killed = kill_when(proc, lambda: time.monotonic() >= at)
        proc.wait()
        assert killed or proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
        keys = key_lines(host)
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and keys
        assert opened(host, keys) == before  # raises InvalidToken if a secret lost its key
        if killed:
            try:
                opened(host, keys[:1])
                landed["after the commit"] += 1
            except InvalidToken:
                changed = (key_file.stat().st_mtime_ns, key_file.stat().st_ino) != stamp
                landed["in the re-encryption" if changed else "before the key file"] += 1
        for direction, name in (("incoming", "desk"), ("outgoing", "out")):
            test = run_cli(direction, "test", name, env=env)
            assert test.returncode == 0, (attempt, test.stderr)
    print(f"\n[{host.engine.dialect.name}] SIGKILL {landed}")
    # The test proved something: kills landed while the store was still under the old key
    # with the new key file on disk (the others, by the clock, before it or after the commit).
    assert landed["in the re-encryption"], landed
    done = run_cli("secrets", "rotate", "--drop-old", env=env)
    assert done.returncode == 0, done.stderr
    [key] = key_lines(host)
    assert opened(host, [key]) == before
    assert not list(key_file.parent.glob(".*.new"))


# ---------------------------------------------------------------------------------------
# A running service
# ---------------------------------------------------------------------------------------


def _wait_for(done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 60  # a safety net, not an assertion on speed
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)


def _poll_again(tmh: Mailhost, box: Path, name: str) -> None:
    (box / f"{name}.eml").write_bytes(f"Subject: {name}\r\n\r\n{name}\r\n".encode())
    with tmh.session() as s:
        s.execute(update(IncomingConnection).values(next_poll_at=None))


def test_a_running_serve_follows_a_rotated_key_file(tmh: Mailhost, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """`serve` started with the old key: after `secrets rotate --drop-old` by another process
    it reads the key file again by itself, says so, and its passes go on."""
    box = tmp_path / "box"
    box.mkdir()
    tmh.connections.add(Direction.INCOMING, ConnectionSpec(name="desk", protocol="dir", folder=str(box),
                                                           username="u", password=PASSWORDS["desk"]))
    tmh.connections.set_enabled("desk", True)
    _poll_again(tmh, box, "before")
    caplog.set_level(logging.INFO, logger="mailhost")
    service = Service(tmh, tick=0.02)
    runner = threading.Thread(target=service.run)
    runner.start()
    try:
        _wait_for(lambda: len(tmh.incoming.items()) == 1)
        assert len(tmh.incoming.items()) == 1
        out = run_cli("secrets", "rotate", "--drop-old")
        assert out.returncode == 0, out.stderr
        _poll_again(tmh, box, "after")
        _wait_for(lambda: len(tmh.incoming.items()) == 2 or tmh.connections.get(Direction.INCOMING, "desk").last_error)
    finally:
        service.stop.set()
        runner.join(timeout=60)
    assert tmh.connections.get(Direction.INCOMING, "desk").last_error is None
    assert sorted(i.subject for i in tmh.incoming.items()) == ["after", "before"]
    said = [r.getMessage() for r in caplog.records if "changed: using its" in r.getMessage()]
    assert said and "1 key(s)" in said[-1], said


def test_a_process_with_the_old_key_in_the_environment_says_to_restart(
        tmh: Mailhost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With $MAILHOST_SECRET_KEY (which no process can change in another), a process that
    still runs with the old key alone fails its passes with a sentence that says to
    restart it with the new variable; restarted so, it works."""
    old = tmh.config.key_file.read_text().strip()
    tmh.config.key_file.unlink()
    monkeypatch.setenv("MAILHOST_SECRET_KEY", old)
    box = tmp_path / "box"
    box.mkdir()
    tmh.connections.add(Direction.INCOMING, ConnectionSpec(name="desk", protocol="dir", folder=str(box),
                                                           username="u", password=PASSWORDS["desk"]))
    tmh.check_key()
    new = Fernet.generate_key().decode()
    out = run_cli("secrets", "rotate", "--json", env={"MAILHOST_SECRET_KEY": f"{new},{old}"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["reencrypted"]["incoming_passwords"] == 1
    [report] = tmh.incoming.fetch(["desk"])
    assert "restart this one with the new MAILHOST_SECRET_KEY" in report.error, report.error
    monkeypatch.setenv("MAILHOST_SECRET_KEY", f"{new},{old}")
    fresh = Mailhost.open(tmh.config.path, plugins=tmh.plugins)
    [report] = fresh.incoming.fetch(["desk"])
    assert report.error is None
    fresh.close()
    out = run_cli("secrets", "drop-old", env={"MAILHOST_SECRET_KEY": f"{new},{old}"})
    assert out.returncode == 0 and "set it to its first key alone" in out.stderr, out.stderr
    assert run_cli("incoming", "show", "desk", env={"MAILHOST_SECRET_KEY": new}).returncode == 0


# ---------------------------------------------------------------------------------------
# Bad input: exit 2, one sentence, nothing changed
# ---------------------------------------------------------------------------------------


def _refused(home: Path, env: dict[str, str], words: str, *args: str) -> None:
    """`mailhost secrets ARGS` (default: rotate) exits 2 with one sentence holding ``words``,
    and changes neither the key file nor a stored secret."""
    key_file = Mailhost.open(home / "mailhost.toml").config.key_file
    key_before = key_file.read_bytes() if key_file.exists() else None
    host = Mailhost.open(home / "mailhost.toml")
    try:
        stored = secrets_of(host)
    finally:
        host.close()
    out = run_cli("secrets", *(args or ("rotate",)), env=env, cwd=home)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert words in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr and not out.stdout
    assert (key_file.read_bytes() if key_file.exists() else None) == key_before
    assert not [p for p in key_file.parent.glob(".*.new") if p.is_file()]
    host = Mailhost.open(home / "mailhost.toml")
    try:
        assert secrets_of(host) == stored
    finally:
        host.close()


@pytest.fixture
def with_secret(home: Path, plugin_env: dict[str, str]) -> dict[str, str]:
    env = {**plugin_env, "MAILHOST_LOAD_PLUGINS": "testplugin", "PW": PASSWORDS["out"]}
    assert run_cli("outgoing", "add", "out", "--protocol", "dir", "--host", "box", "--username", "u",
                   "--password-env", "PW", env=env, cwd=home).returncode == 0
    return env


@pytest.mark.parametrize("where", ["environment", "file"])
def test_an_invalid_new_key_is_refused(home: Path, with_secret: dict[str, str], where: str) -> None:
    """A new key that is no Fernet key, put first in $MAILHOST_SECRET_KEY or in the key
    file by hand: named by its place, never shown."""
    key_file = home / "mailhost.key"
    old = key_file.read_text().strip()
    if where == "file":
        key_file.write_text(f"not-a-key\n{old}\n")
        _refused(home, with_secret, f"key 1 of the 2 in the secret key file {key_file} is not a valid Fernet key")
        return
    key_file.unlink()
    _refused(home, {**with_secret, "MAILHOST_SECRET_KEY": f"not-a-key,{old}"},
             "key 1 of the 2 in $MAILHOST_SECRET_KEY is not a valid Fernet key")


def test_a_wrong_current_key_is_refused(home: Path, with_secret: dict[str, str]) -> None:
    """A key file whose key does not open the store: nothing re-encrypted, no new key written."""
    (home / "mailhost.key").write_bytes(Fernet.generate_key() + b"\n")
    _refused(home, with_secret, "cannot be decrypted with the key(s) in the secret key file")


def test_one_key_in_the_environment_is_refused(home: Path, with_secret: dict[str, str]) -> None:
    """$MAILHOST_SECRET_KEY with its one key: mailhost cannot write the new one there; say how."""
    old = (home / "mailhost.key").read_text().strip()
    _refused(home, {**with_secret, "MAILHOST_SECRET_KEY": old}, "put a new key before it, comma-separated")
    new = Fernet.generate_key().decode()
    _refused(home, {**with_secret, "MAILHOST_SECRET_KEY": f"{new},{old}"}, "--drop-old cannot edit",
             "rotate", "--drop-old")


def test_a_key_file_that_cannot_be_written_is_refused(home: Path, with_secret: dict[str, str]) -> None:
    """The key file's folder refuses the new file: exit 2, nothing changed, and the
    connection still works. (As root, who may write any folder, the temporary file's
    name is taken by a folder instead: the write itself fails.)"""
    folder = home / "keys"
    folder.mkdir()
    (home / "mailhost.key").rename(folder / "mailhost.key")
    config = home / "mailhost.toml"
    config.write_text(config.read_text().replace('key_file = "mailhost.key"', 'key_file = "keys/mailhost.key"'))
    blocker = folder / ".mailhost.key.new"
    if os.geteuid() == 0:
        blocker.mkdir()
    else:
        folder.chmod(0o500)
    try:
        _refused(home, with_secret, "cannot write the secret key file")
    finally:
        folder.chmod(0o700)
        if blocker.is_dir():
            blocker.rmdir()
    assert run_cli("outgoing", "test", "out", env=with_secret, cwd=home).returncode == 0


def test_a_key_file_on_a_read_only_file_system_says_so(home: Path, with_secret: dict[str, str]) -> None:
    """A key file on a read-only mount (a Kubernetes secret volume, say) is refused saying
    the file system is read-only, not "Permission denied: make it writable for this
    user", which no chown can fix. Needs a read-only bind mount: root with CAP_SYS_ADMIN."""
    import subprocess

    folder, view = home / "keys", home / "keys-ro"
    folder.mkdir()
    view.mkdir()
    (home / "mailhost.key").rename(folder / "mailhost.key")
    if subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(view)], capture_output=True).returncode:
        reason = "cannot make a read-only bind mount here (needs root with CAP_SYS_ADMIN)"
        if in_ci():  # CI runs as root on a machine that can: never skipped there
            pytest.fail(f"{reason}, and CI=true must run this test")
        pytest.skip(reason)
    try:
        config = home / "mailhost.toml"
        config.write_text(config.read_text().replace('key_file = "mailhost.key"', 'key_file = "keys-ro/mailhost.key"'))
        _refused(home, with_secret, "(Read-only file system): the key file's file system is mounted read-only")
    finally:
        subprocess.run(["umount", str(view)], check=True)
