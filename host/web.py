"""The web admin and its REST API: read-only views of what the seeds show as admin pages.

Pages (Jinja2, autoescaped): connections, the incoming and outgoing queues, the incoming
log, plugins and the options their protocols declare. The same data as JSON under
``/api/...``, with the CLI's JSON shapes. It has no sign-in of its own, so it listens on
127.0.0.1 by default; put it behind a proxy that authenticates before exposing it.
Listening on 127.0.0.1 protects nothing against a web page whose name rebinds to
127.0.0.1, so a request addressed to any other name than this machine's own and
``[web] allowed_hosts`` is refused (421). Message bodies are never rendered.
"""
from __future__ import annotations

import errno
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from jinja2 import Environment, PackageLoader, select_autoescape

from .config import listen_address
from .errors import ConfigError, MailhostError, StoreError, ValidationError
from .incoming import item_dict
from .outgoing import item_dict as outgoing_item_dict
from .plugins import OPTION_COLUMNS
from .protocols import Direction
from .secrets import redact
from .store import MAX_ROWS, json_value, text_value

if TYPE_CHECKING:
    from .app import Mailhost

__all__ = ["REQUEST_TIMEOUT", "WebAdmin", "start_web"]

log = logging.getLogger(__name__)

_env = Environment(loader=PackageLoader("mailhost", "templates"), autoescape=select_autoescape(["html"]))


_env.filters["cell"] = text_value  # as the CLI shows it


class WebAdmin:
    """A WSGI application over one installation."""

    def __init__(self, host: Mailhost, listen: str | None = None) -> None:
        self.host = host
        # A page on any website can reach 127.0.0.1 by rebinding its own name to it, and
        # read the answers as same-origin: only requests addressed to this machine's
        # own names (and the ones the admin lists, e.g. a proxy's) are answered.
        listen = host.config.web_listen if listen is None else listen
        self.host_names = {"localhost", "127.0.0.1", "::1", *map(_host_name, host.config.web_allowed_hosts)}
        if listen:
            self.host_names.add(listen_address(listen)[0].lower())
        self.routes: dict[str, tuple[str, Callable[[dict[str, list[str]]], list[dict[str, Any]]], list[str]]] = {
            "incoming": ("Incoming connections", self._incoming,
                         ["name", "protocol", "host", "username", "folder", "options", "enabled", "last_poll_at",
                          "last_error"]),
            "outgoing": ("Outgoing connections", self._outgoing,
                         ["name", "protocol", "host", "username", "from_address", "options", "default"]),
            "queue/incoming": ("Incoming mail queue", self._queue_incoming,
                               ["id", "connection", "status", "from", "subject", "size", "created_at"]),
            "queue/outgoing": ("Outgoing mail queue", self._queue_outgoing,
                               ["id", "connection", "status", "to", "subject", "attempts", "last_error"]),
            "log/incoming": ("Incoming mail log", self._log_incoming,
                             ["id", "connection", "status", "started_at", "stored", "duplicates", "bytes", "error"]),
            "plugins": ("Plugins", self._plugins, ["name", "distribution", "version", "state", "error"]),
            "plugins/options": ("Protocol options", self._options,
                                list(OPTION_COLUMNS)),
        }

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        requested = environ.get("HTTP_HOST")  # absent only from non-browser HTTP/1.0 clients
        if requested is not None and _host_name(requested) not in self.host_names:
            log.info("web: refused a request addressed to %r (not in [web] allowed_hosts)", requested)
            return self._send(start_response, "421 Misdirected Request", "text/plain",
                              f"this web admin does not answer to the name {_host_name(requested)!r}: use "
                              "localhost or 127.0.0.1, or add the name to [web] allowed_hosts in the config "
                              "file".encode())
        try:
            return self._answer(environ, start_response)
        except StoreError as exc:  # the store is away for a while (restart, lost link): not a bug
            return self._send(start_response, "503 Service Unavailable", "application/json",
                              json.dumps({"error": redact(str(exc))}).encode(), [("Retry-After", "30")])
        except MailhostError as exc:  # bad input (400) or a failure it explains (500), in one sentence
            status = "400 Bad Request" if exc.exit_code == 2 else "500 Internal Server Error"
            return self._send(start_response, status, "application/json",
                              json.dumps({"error": redact(str(exc))}).encode())
        except Exception as exc:  # a bug: said in the log, redacted; the client learns no internals
            log.error("web: %s failed: unexpected error %s: %s (run with -vv for the traceback)",
                      environ.get("PATH_INFO", "/"), type(exc).__name__, redact(str(exc)))
            log.debug("web: the traceback of that error", exc_info=True)
            return self._send(start_response, "500 Internal Server Error", "application/json",
                              json.dumps({"error": "unexpected error; the service's log says more"}).encode())

    def _answer(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO", "/").strip("/")
        query = parse_qs(environ.get("QUERY_STRING", ""))
        api = path.startswith("api/")
        key = path[4:] if api else path
        method = environ.get("REQUEST_METHOD", "GET")
        if method == "HEAD":  # a monitor's check (curl -I): GET's status and headers, no body
            self._answer({**environ, "REQUEST_METHOD": "GET"}, start_response)
            return [b""]
        if method != "GET":
            return self._send(start_response, "405 Method Not Allowed", "text/plain", b"read-only",
                              [("Allow", "GET, HEAD")])
        if key == "" and not api:
            body = _env.get_template("index.html").render(pages=self.routes)
            return self._send(start_response, "200 OK", "text/html; charset=utf-8", body.encode())
        if key not in self.routes:
            return self._send(start_response, "404 Not Found", "text/plain", b"not found")
        title, rows_for, columns = self.routes[key]
        rows = rows_for(query)
        if api:
            return self._send(start_response, "200 OK", "application/json",
                              json.dumps(rows, default=json_value, ensure_ascii=False).encode())
        body = _env.get_template("table.html").render(title=title, columns=columns, rows=rows, pages=self.routes)
        return self._send(start_response, "200 OK", "text/html; charset=utf-8", body.encode())

    @staticmethod
    def _send(start_response: Callable[..., Any], status: str, ctype: str, body: bytes,
              extra: Iterable[tuple[str, str]] = ()) -> list[bytes]:
        start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body))),
                                ("X-Content-Type-Options", "nosniff"),
                                ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
                                *extra])
        return [body]

    # -- data (the CLI's JSON shapes) -------------------------------------------------

    def _incoming(self, q: dict[str, list[str]]) -> list[dict[str, Any]]:
        return [self.host.connections.as_dict(Direction.INCOMING, c) for c in
                self.host.connections.list(Direction.INCOMING, _one(q, "search"))]

    def _outgoing(self, q: dict[str, list[str]]) -> list[dict[str, Any]]:
        return [self.host.connections.as_dict(Direction.OUTGOING, c) for c in
                self.host.connections.list(Direction.OUTGOING, _one(q, "search"))]

    def _queue_incoming(self, q: dict[str, list[str]]) -> list[dict[str, Any]]:
        return [item_dict(i) for i in self.host.incoming.items(_one(q, "connection"), _one(q, "status"),
                                                                 _limit(q))]

    def _queue_outgoing(self, q: dict[str, list[str]]) -> list[dict[str, Any]]:
        return [outgoing_item_dict(i) for i in self.host.outgoing.items(_one(q, "status"), _one(q, "connection"),
                                                                         _limit(q))]

    def _log_incoming(self, q: dict[str, list[str]]) -> list[dict[str, Any]]:
        return [{"id": e.id, "connection": e.connection_name, "status": e.status, "started_at": e.started_at,
                 "finished_at": e.finished_at, "listed": e.listed, "stored": e.stored, "duplicates": e.duplicates,
                 "acknowledged": e.acknowledged, "bytes": e.bytes, "error": e.error}
                for e in self.host.incoming.logs(_one(q, "connection"), _limit(q))]

    def _plugins(self, q: dict[str, list[str]]) -> list[dict[str, Any]]:
        return [p.as_dict() for p in self.host.plugins.plugins.values()]

    def _options(self, q: dict[str, list[str]]) -> list[dict[str, Any]]:
        return self.host.plugins.option_rows(_one(q, "protocol"))


#: Seconds a client may take to send its request or read the answer; then its
#: connection is closed and its thread ends.
REQUEST_TIMEOUT = 30.0


class _QuietHandler(WSGIRequestHandler):
    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # type: ignore[attr-defined]  # socket timeout, set by setup()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("web: " + format, *args)


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per request, so that one slow or idle client cannot hold up the others;
    daemon threads, so that a client never keeps the service from stopping."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[WSGIRequestHandler],
                 request_timeout: float = REQUEST_TIMEOUT) -> None:
        self.request_timeout = request_timeout
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that times out or hangs up is no error of ours: no traceback on stderr.
        log.debug("web: request from %s ended early", client_address[0], exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class RunningWeb:
    """A web admin serving in a background thread."""

    def __init__(self, server: WSGIServer) -> None:
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, name="web", daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        host, port = self.server.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_web(host: Mailhost, listen: str, request_timeout: float = REQUEST_TIMEOUT) -> RunningWeb:
    """Serve the web admin on ``listen`` (``HOST:PORT``, IPv6 as ``[::1]:PORT``) in a
    background thread, each request in a thread of its own."""
    try:
        name, port = listen_address(listen)
        server = (_Server6 if ":" in name else _Server)((name, port), _QuietHandler, request_timeout)
        server.set_app(WebAdmin(host, listen))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:  # most often this installation's serve, started twice
            raise ConfigError(f"cannot serve the web admin on {listen!r}: another program listens there, perhaps "
                              "another `mailhost serve` (see `ss -ltnp`): stop it, or give this one another [web] "
                              f"listen in {host.config.path} (\"\" turns its web admin off)") from None
        raise ConfigError(f"cannot serve the web admin on {listen!r} ({exc}): change [web] listen in "
                          f"{host.config.path}, or set it to \"\" to turn the web admin off") from None
    except ValueError as exc:
        raise ConfigError(f"cannot serve the web admin on {listen!r} ({exc}): change [web] listen in "
                          f"{host.config.path}, or set it to \"\" to turn the web admin off") from None
    return RunningWeb(server)


def _host_name(header: str) -> str:
    """The name in a Host header, without its port or brackets, lower case."""
    if header.startswith("["):
        name = header[1:].partition("]")[0]
    else:
        name = header.partition(":")[0]
    return name.rstrip(".").lower()


def _one(q: dict[str, list[str]], key: str) -> str | None:
    values = q.get(key)
    return values[0] if values else None


def _limit(q: dict[str, list[str]]) -> int:
    """``?limit=N``: at most N rows (1 to MAX_ROWS, like the CLI's ``--limit``); 200 if absent."""
    value = _one(q, "limit")
    if value is None:
        return 200
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= MAX_ROWS):  # '²'.isdigit() is True
        raise ValidationError(f"limit={value!r} is not valid: give a whole number from 1 to {MAX_ROWS}",
                              field="limit")
    return int(value)
