"""Secrets: encrypted at rest, never printed, never logged, one redaction helper."""
from __future__ import annotations

import base64
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from mailhost import Mailhost
from mailhost.connections import ConnectionSpec
from mailhost.errors import ConfigError
from mailhost.protocols import Direction
from mailhost.secrets import REDACTED, RedactingFilter, Vault, redact

from .helpers import run_cli

PASSWORD = "Tr0ub4dor&3-horse-battery"


def test_key_file_is_private(home: Path) -> None:
    """`init` writes the key with mode 0600."""
    assert stat.S_IMODE(os.stat(home / "mailhost.key").st_mode) == 0o600


def test_init_over_a_store_whose_key_file_is_lost_makes_no_new_key(home: Path, plugin_env: dict[str, str]) -> None:
    """`init` on an installation whose key file is gone, and whose store holds secrets:
    a new key would open none of them, so init refuses (exit 2, naming the file to
    restore) and writes none, instead of reporting success with a key that every later
    command refuses; with the file restored, all works as before."""
    env = {**plugin_env, "MAILHOST_LOAD_PLUGINS": "testplugin", "PW": PASSWORD}
    assert run_cli("outgoing", "add", "o", "--protocol", "dir", "--host", "box", "--username", "u",
                   "--password-env", "PW", env=env, cwd=home).returncode == 0
    key = home / "mailhost.key"
    kept = key.read_bytes()
    key.unlink()
    out = run_cli("init", env=env, cwd=home)
    assert out.returncode == 2, out.stderr
    assert f"the secret key file {key} is missing, and the store holds secrets" in out.stderr, out.stderr
    assert "restore that file" in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not key.exists()
    key.write_bytes(kept)
    assert run_cli("init", env=env, cwd=home).returncode == 0
    assert run_cli("outgoing", "test", "o", env=env, cwd=home).returncode == 0


def test_init_makes_config_and_store_private(tmp_path: Path) -> None:
    """`init` creates the config (it may hold a database password) and the SQLite store
    (all downloaded mail) with mode 0600, like the key, whatever the umask."""
    old = os.umask(0o022)
    try:
        Mailhost.init(tmp_path / "mailhost.toml").close()
    finally:
        os.umask(old)
    made = [p for p in tmp_path.iterdir() if p.name.startswith("mailhost.")]
    assert {"mailhost.toml", "mailhost.key", "mailhost.db"} <= {p.name for p in made}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in made} == {p.name: 0o600 for p in made}


def test_plugin_edits_keep_the_config_file_mode_owner_and_symlink(home: Path, plugin_env: dict[str, str]) -> None:
    """`plugins disable`/`enable` rewrite a symlinked config's target, not the link, and
    keep its mode (and, as root, its owner)."""
    real = home / "etc" / "mailhost.toml"
    real.parent.mkdir()
    (home / "mailhost.toml").rename(real)
    (home / "mailhost.toml").symlink_to(real)
    real.chmod(0o640)
    if os.geteuid() == 0:
        os.chown(real, 4321, 4321)
    for verb in ("disable", "enable"):
        out = run_cli("plugins", verb, "testplugin", env=plugin_env, cwd=home)
        assert out.returncode == 0, out.stderr
        assert (home / "mailhost.toml").is_symlink()
        st = real.stat()
        assert stat.S_IMODE(st.st_mode) == 0o640
        if os.geteuid() == 0:
            assert (st.st_uid, st.st_gid) == (4321, 4321)
    assert 'disabled = []' in real.read_text() and list(real.parent.iterdir()) == [real]


def test_password_not_in_store_config_or_output(home: Path, plugin_env: dict[str, str], tmp_path: Path) -> None:
    """grep finds the password nowhere: not in the database, the config, the output, the log."""
    env = {**plugin_env, "MAILHOST_LOAD_PLUGINS": "testplugin", "PW": PASSWORD}
    out = run_cli("-vv", "outgoing", "add", "o", "--protocol", "dir", "--host", "box", "--username", "u",
                  "--password-env", "PW", "--debug", env=env, cwd=home)
    assert out.returncode == 0, out.stderr
    shown = run_cli("-vv", "outgoing", "show", "o", "--json", env=env, cwd=home)
    blobs = [p.read_bytes() for p in home.iterdir() if p.is_file() and p.name != "mailhost.key"]
    for form in (PASSWORD, base64.b64encode(PASSWORD.encode()).decode()):
        assert all(form.encode() not in b for b in blobs)
        assert form not in out.stdout + out.stderr + shown.stdout + shown.stderr


def test_wrong_key_is_a_clear_error(mh: Mailhost, home: Path, testplugin, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store read with another key says which key is wrong and what to do."""
    from mailhost.plugins import PluginHost

    host = Mailhost.open(home / "mailhost.toml", plugins=PluginHost(only=[], extra=[("testplugin", testplugin)]))
    conn = host.connections.add(Direction.OUTGOING, ConnectionSpec(name="o", protocol="dir", host="b", username="u",
                                                                   password=PASSWORD))
    from cryptography.fernet import Fernet

    monkeypatch.setenv("MAILHOST_SECRET_KEY", Fernet.generate_key().decode())
    other = Mailhost.open(home / "mailhost.toml", plugins=host.plugins)
    with pytest.raises(ConfigError, match="cannot be decrypted with this key"):
        other.connections.settings(Direction.OUTGOING, conn)


def test_wrong_key_writes_no_secret(home: Path, plugin_env: dict[str, str]) -> None:
    """A new secret under another key than the store's is refused before it is written:
    the store never holds secrets of two keys (exit 2, nothing changed)."""
    from cryptography.fernet import Fernet

    env = {**plugin_env, "MAILHOST_LOAD_PLUGINS": "testplugin", "PW": PASSWORD}
    add = ("outgoing", "add", "o", "--protocol", "dir", "--host", "box", "--username", "u", "--password-env", "PW")
    assert run_cli(*add, env=env, cwd=home).returncode == 0
    wrong = {**env, "MAILHOST_SECRET_KEY": Fernet.generate_key().decode()}
    before = run_cli("outgoing", "list", "--json", env=env, cwd=home).stdout
    for args in (("outgoing", "add", "o2", *add[3:]), ("outgoing", "edit", "o", "--password-env", "PW")):
        out = run_cli(*args, env=wrong, cwd=home)
        assert out.returncode == 2 and "cannot be decrypted with this key" in out.stderr, out.stderr
    assert run_cli("outgoing", "list", "--json", env=env, cwd=home).stdout == before
    assert run_cli("outgoing", "test", "o", env=env, cwd=home).returncode != 2  # the right key still reads it


def test_missing_key_file(home: Path) -> None:
    """A missing key file is named, with the fix."""
    (home / "mailhost.key").unlink()
    with pytest.raises(ConfigError, match="secret key file .* is missing"):
        Vault.from_env_or_file(home / "mailhost.key")


def test_unreadable_key_file(home: Path, plugin_env: dict[str, str]) -> None:
    """A key file that cannot be read (a folder, no permission) is bad configuration: exit 2,
    one sentence naming the file and the fix, no traceback, nothing written."""
    key = home / "mailhost.key"
    key.unlink()
    key.mkdir()
    with pytest.raises(ConfigError, match="secret key file .* cannot be read"):
        Vault.from_env_or_file(key)
    env = {**plugin_env, "MAILHOST_LOAD_PLUGINS": "testplugin", "PW": PASSWORD}
    out = run_cli("outgoing", "add", "o", "--protocol", "dir", "--host", "box", "--username", "u",
                  "--password-env", "PW", env=env, cwd=home)
    assert out.returncode == 2, out.stderr
    assert "cannot be read" in out.stderr and str(key) in out.stderr and "Traceback" not in out.stderr
    assert run_cli("outgoing", "list", "--json", env=env, cwd=home).stdout.strip() == "[]"


@pytest.mark.parametrize("broken", ["missing", "folder", "invalid", "other"])
def test_pipelines_check_the_key_first(home: Path, plugin_env: dict[str, str], tmp_path: Path, broken: str) -> None:
    """fetch, deliver and serve with a key that cannot open the store's secrets stop at once
    with exit 2, before any pass: no failed log entry, no delivery attempt counted."""
    from cryptography.fernet import Fernet

    env = {**plugin_env, "MAILHOST_LOAD_PLUGINS": "testplugin", "PW": PASSWORD}
    box = tmp_path / "box"
    box.mkdir()
    (box / "m1").write_bytes(b"Subject: one\r\n\r\nbody\r\n")
    for args in (("incoming", "add", "in", "--protocol", "dir", "--folder", str(box), "--username", "u",
                  "--password-env", "PW"),
                 ("incoming", "enable", "in", "--yes"),
                 ("outgoing", "add", "out", "--protocol", "dir", "--host", "box", "--username", "u",
                  "--password-env", "PW", "--from", "a@example.org", "--default"),
                 ("send", "--to", "b@example.org", "--subject", "s", "--body", "b")):
        done = run_cli(*args, env=env, cwd=home)
        assert done.returncode == 0, done.stderr
    key = home / "mailhost.key"
    wrong = dict(env)
    if broken == "missing":
        key.unlink()
    elif broken == "folder":
        key.unlink()
        key.mkdir()
    else:
        wrong["MAILHOST_SECRET_KEY"] = "not-a-key" if broken == "invalid" else Fernet.generate_key().decode()
    for args in (("fetch",), ("fetch", "in"), ("deliver",), ("serve", "--once")):
        out = run_cli(*args, env=wrong, cwd=home)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)
        assert "key" in out.stderr and not out.stdout, (args, out.stderr)
    # Listings need no key: read what the commands above left behind.
    listing = run_cli("log", "incoming", "--json", env=wrong, cwd=home)
    assert listing.returncode == 0 and listing.stdout.strip() == "[]", listing.stderr
    [item] = json.loads(run_cli("queue", "outgoing", "--json", env=wrong, cwd=home).stdout)
    assert item["attempts"] == 0 and item["status"] == "queued"


def test_redact_hides_secret_base64_and_sasl() -> None:
    """redact() hides the secret, its base64 forms, SASL lines and bearer tokens."""
    secret = "pa55-w0rd-xyz"
    plain = base64.b64encode(b"\0user\0" + secret.encode()).decode()
    text = redact(f"pw={secret} b64={base64.b64encode(secret.encode()).decode()} AUTH PLAIN {plain}\n"
                  "Authorization: Bearer eyJabc.def", secret)
    assert secret not in text and plain not in text and "eyJabc" not in text
    assert text.count(REDACTED) >= 3


def test_logging_filter_redacts_remembered_secrets(caplog: pytest.LogCaptureFixture) -> None:
    """Any log record that carries a decrypted secret is redacted by the filter."""
    vault = Vault(Vault.__init__.__globals__["Fernet"].generate_key())
    token = vault.encrypt("another-S3cret!")
    vault.decrypt(token)  # decrypting remembers it
    handler = logging.StreamHandler()
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "login with %s", ("another-S3cret!",), None)
    RedactingFilter().filter(record)
    assert "another-S3cret!" not in record.getMessage()
    del handler
