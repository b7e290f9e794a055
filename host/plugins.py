"""Plugin loading: entry points found by stevedore, registered into pluggy, once.

Rules, in order:

1. The host's own plugins are registered first, like any plugin: :mod:`mailhost.builtin`
   (the after-download actions; always on), :mod:`mailhost.smime` (S/MIME
   decryption; ``[plugins] disabled = ["smime"]`` turns it off, to let another plugin
   decrypt) and :mod:`mailhost.oauth_providers` (the ``microsoft``, ``google`` and
   ``oidc`` OAuth2 providers and Microsoft 365's host overrides; ``oauth``).
2. Entry points in the group ``mailhost`` are listed without importing them. A plugin
   is loaded if it is allowed by ``$MAILHOST_LOAD_PLUGINS`` (an allowlist), by
   ``[plugins] enabled`` (empty means all; ``["builtin"]`` none but the host's own) and
   not named in ``[plugins] disabled``.
   A plugin that is not loaded is never imported.
3. A plugin that fails to import, whose hook implementations do not match the specs
   (an unknown hook name, a wrong argument, a hook function without ``@hookimpl``),
   whose ``register_*`` hook raises (any exception, SystemExit included; only
   KeyboardInterrupt goes through) or registers anything but the hook's kind, is
   marked *failed* with its error and the host runs on; ``$MAILHOST_STRICT_PLUGINS=1``
   turns that into a :class:`~mailhost.errors.PluginError`.
4. Two plugins registering the same protocol (direction and name): the one named in
   ``[plugins.protocols]`` wins, else the plugin whose name sorts first; the loser is
   told in ``mailhost plugins list``. Actions, host overrides and OAuth2 providers
   follow the same rule.
"""
from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import pluggy
from stevedore import NamedExtensionManager

from . import hookspecs
from .errors import PluginError, ValidationError
from .oauth_providers import OAuthProvider
from .protocols import AfterDownloadAction, Direction, HostOverride, ProtocolProvider

__all__ = ["ENTRY_POINT_GROUP", "OPTION_COLUMNS", "PluginHost", "PluginInfo", "installed_plugin_names",
           "plugin_host"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mailhost"
BUILTIN = "builtin"
#: The columns of :meth:`PluginHost.option_rows` that `mailhost plugins options` and the
#: web admin show.
OPTION_COLUMNS = ("protocol", "name", "type", "default", "required", "choices", "minimum", "maximum", "description")
#: The host's own plugins, by name: the module, and whether the config may disable it.
BUILTINS: dict[str, tuple[str, bool]] = {
    BUILTIN: ("mailhost.builtin", False),
    "smime": ("mailhost.smime", True),
    "oauth": ("mailhost.oauth_providers", True),
}

#: The distribution that brings each bundled protocol, to name when one is asked for and
#: not installed.
BUNDLED_PROTOCOLS: dict[tuple[Direction, str], str] = {
    (Direction.INCOMING, "imap"): "mailhost-imap",
    (Direction.INCOMING, "pop3"): "mailhost-pop3",
    (Direction.INCOMING, "graph"): "mailhost-graph",
    (Direction.OUTGOING, "smtp"): "mailhost-smtp",
    (Direction.OUTGOING, "graph"): "mailhost-graph",
}

State = Literal["enabled", "disabled", "failed"]


@dataclass
class PluginInfo:
    """One plugin as ``mailhost plugins list`` shows it."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    state: State = "enabled"
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    protocols: list[str] = field(default_factory=list)
    after_download_actions: list[str] = field(default_factory=list)
    host_overrides: list[str] = field(default_factory=list)
    oauth_providers: list[str] = field(default_factory=list)
    #: The options each of its protocols declares, by ``direction/name``.
    protocol_options: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: The entry point, to find the distribution and version when they are asked for
    #: (finding them scans every installed distribution: too slow for every start-up).
    entry_point: importlib.metadata.EntryPoint | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        if self.distribution is None and self.entry_point is not None:
            self.distribution, self.version = _distribution_of(self.entry_point)
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "state": self.state,
            "error": self.error,
            "hooks": self.hooks,
            "protocols": self.protocols,
            "after_download_actions": self.after_download_actions,
            "host_overrides": self.host_overrides,
            "oauth_providers": self.oauth_providers,
            "protocol_options": self.protocol_options,
            "notes": self.notes,
        }


class PluginHost:
    """The loaded plugins and what they registered."""

    def __init__(
        self,
        enabled: Iterable[str] = (),
        disabled: Iterable[str] = (),
        protocol_choices: dict[str, str] | None = None,
        strict: bool | None = None,
        only: Iterable[str] | None = None,
        extra: Iterable[tuple[str, object]] = (),
    ) -> None:
        """Discover and load plugins.

        ``only`` is the ``$MAILHOST_LOAD_PLUGINS`` allowlist (read from the environment
        when ``None``); ``extra`` registers ``(name, plugin)`` objects directly, after
        the entry points (for library users and tests).
        """
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.strict = _env_flag("MAILHOST_STRICT_PLUGINS") if strict is None else strict
        self.plugins: dict[str, PluginInfo] = {}
        self.protocols: dict[tuple[Direction, str], ProtocolProvider] = {}
        self.actions: dict[str, AfterDownloadAction] = {}
        self.host_overrides: list[HostOverride] = []
        self.oauth_providers: dict[str, OAuthProvider] = {}
        self._choices = protocol_choices or {}
        if only is None:
            env = os.environ.get("MAILHOST_LOAD_PLUGINS")
            only = [n.strip() for n in env.split(",") if n.strip()] if env is not None else None
        self._only = set(only) if only is not None else None
        self._enabled, self._disabled = set(enabled), set(disabled)

        for name, (module, optional) in BUILTINS.items():
            info = PluginInfo(name, module, "mailhost", _own_version())
            if optional and name in self._disabled:
                info.state = "disabled"  # and never imported
                self.plugins[name] = info
            else:
                self._register(name, importlib.import_module(module), info)
        self._load_entry_points()
        for name, obj in extra:
            self._register(name, obj, PluginInfo(name, getattr(obj, "__name__", repr(obj))))
        self._collect()

    # -- loading ----------------------------------------------------------------------

    def allowed(self, name: str) -> bool:
        """Whether the plugin ``name`` may be loaded under the config and environment."""
        if name in BUILTINS:
            return name == BUILTIN or name not in self._disabled
        if self._only is not None and name not in self._only:
            return False
        if self._enabled and name not in self._enabled:
            return False
        return name not in self._disabled

    def _load_entry_points(self) -> None:
        # One scan of the entry points (stevedore's cache), then each allowed one is
        # imported here: stevedore's loader catches only Exception, so a plugin raising
        # SystemExit at import ended the host. A disabled plugin is never imported.
        for ep in sorted(_entry_points(), key=lambda e: e.name):
            if ep.name in self.plugins:
                log.warning("plugin %s is installed twice; using %s", ep.name, self.plugins[ep.name].module)
                continue
            info = PluginInfo(ep.name, ep.value.split(":")[0])
            info.entry_point = ep
            self.plugins[ep.name] = info
            if not self.allowed(ep.name):
                info.state = "disabled"
                continue
            try:
                plugin = ep.load()
            except KeyboardInterrupt:  # the admin's, not the plugin's
                raise
            except BaseException as exc:  # SystemExit too: a plugin never stops the host
                self._fail(info, f"import failed: {_describe(exc)}", exc)
                continue
            self._register(ep.name, plugin, info)
        for names, where in ((self._only, "$MAILHOST_LOAD_PLUGINS"), (self._enabled, "[plugins] enabled"),
                             (self._disabled, "[plugins] disabled"),
                             (set(self._choices.values()), "[plugins.protocols]")):
            unknown = sorted(set(names or ()) - set(self.plugins) - set(BUILTINS))
            if unknown:  # a typo: it would silently allow, deny or choose nothing by that name
                message = (f"{where} names {', '.join(unknown)}, which no installed plugin is called; "
                           f"installed: {', '.join(sorted(self.plugins)) or 'none'}")
                if self.strict:
                    raise PluginError(message)
                log.warning("%s", message)

    def _register(self, name: str, plugin: object, info: PluginInfo) -> None:
        self.plugins[name] = info
        unmarked = sorted(hook for hook in self._hook_names if callable(getattr(plugin, hook, None))
                          and self.pm.parse_hookimpl_opts(plugin, hook) is None
                          and not hasattr(getattr(plugin, hook), f"{hookspecs.PROJECT}_spec"))
        if unmarked:  # pluggy passes over an unmarked function: the plugin would run without it
            self._fail(info, f"defines {', '.join(unmarked)} without @mailhost.hookimpl, so mailhost would never "
                       "call it: mark it with @hookimpl (from mailhost import hookimpl)", TypeError())
            return
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:  # pluggy validates every hookimpl against its spec
            self._fail(info, f"does not match the hook specs: {_describe(exc)}", exc)
            return
        try:
            self.pm.check_pending()  # hook names with no spec: typos
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            unknown = [hook for hook in self._hook_names_of(plugin) if hook not in self._hook_names]
            hint = "; ".join(f"{hook}: did you mean {close[0]}?" for hook in unknown
                             if (close := difflib.get_close_matches(hook, self._hook_names, n=1)))
            self._fail(info, f"implements an unknown hook: {_describe(exc)}" + (f" ({hint})" if hint else ""), exc)
            return
        info.hooks = sorted(
            {caller.name for caller in self.pm.get_hookcallers(plugin) or []}
        )

    @functools.cached_property
    def _hook_names(self) -> list[str]:
        """The hooks the specs define."""
        return sorted(name for name in dir(self.pm.hook) if not name.startswith("_"))

    def _hook_names_of(self, plugin: object) -> list[str]:
        """The names of ``plugin``'s functions marked as hook implementations."""
        return [name for name in dir(plugin) if self.pm.parse_hookimpl_opts(plugin, name) is not None]

    def _fail(self, info: PluginInfo, why: str, exc: BaseException) -> None:
        info.state, info.error = "failed", why
        info.hooks = info.protocols = info.after_download_actions = info.host_overrides = []
        info.oauth_providers = []
        if self.pm.is_registered(self.pm.get_plugin(info.name)):
            self.pm.unregister(name=info.name)
        message = f"plugin {info.name} ({info.module}) {why}"
        if self.strict:
            raise PluginError(f"{message}; strict plugin loading is on (MAILHOST_STRICT_PLUGINS)") from exc
        log.warning("%s; it is disabled for this run", message)

    # -- registries -------------------------------------------------------------------

    def _collect(self) -> None:
        protocols = self._gather("register_protocols")
        actions = self._gather("register_after_download_actions")
        overrides = self._gather("register_host_overrides")
        oauth_providers = self._gather("register_oauth_providers")
        # What a plugin registers must be of the hook's kind: anything else would be
        # dropped without a word (or break a listing later), so the plugin fails here.
        for hook, gathered, kind in (("register_protocols", protocols, ProtocolProvider),
                                     ("register_after_download_actions", actions, AfterDownloadAction),
                                     ("register_host_overrides", overrides, HostOverride),
                                     ("register_oauth_providers", oauth_providers, OAuthProvider)):
            for plugin, items in gathered.items():
                wrong = next((item for item in items if not isinstance(item, kind)), None)
                if wrong is not None and self.plugins[plugin].state != "failed":
                    self._fail(self.plugins[plugin], f"registered {_short(wrong)} in {hook}, which takes "
                               f"{kind.__name__} objects (from {kind.__module__})", TypeError())
        self._settle(
            protocols, ProtocolProvider, lambda p: (p.direction, p.name),
            lambda p: f"{p.direction.value}/{p.name}", self.protocols,
            lambda info, label: info.protocols.append(label),
        )
        for (direction, name), provider in self.protocols.items():
            self.plugins[provider.plugin].protocol_options[f"{direction.value}/{name}"] = [
                o.as_dict() for o in provider.options]
        self._settle(
            actions, AfterDownloadAction, lambda a: a.name, lambda a: a.name, self.actions,
            lambda info, label: info.after_download_actions.append(label),
        )
        chosen_overrides: dict[tuple[str, str, str], HostOverride] = {}
        self._settle(
            overrides, HostOverride, lambda o: (o.provider, o.protocol, o.name),
            lambda o: f"{o.provider}/{o.protocol}/{o.name}", chosen_overrides,
            lambda info, label: info.host_overrides.append(label),
        )
        self.host_overrides = sorted(chosen_overrides.values(), key=lambda o: (o.provider, o.protocol, o.name))
        self._settle(
            oauth_providers, OAuthProvider, lambda p: p.name, lambda p: f"oauth/{p.name}", self.oauth_providers,
            lambda info, label: info.oauth_providers.append(label),
        )

    def _gather(self, hook: str) -> dict[str, list[Any]]:
        """Call one registration hook plugin by plugin, so that each registration is
        attributed to its plugin and a plugin that raises fails alone."""
        gathered: dict[str, list[Any]] = {}
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            items: list[Any] = []
            try:
                impl.function(*[items.append for _ in impl.argnames])
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # SystemExit too, as at import
                self._fail(self.plugins[impl.plugin_name], f"raised in {hook}: {_describe(exc)}", exc)
                continue
            gathered[impl.plugin_name] = items
        return gathered

    def _settle(
        self,
        gathered: dict[str, list[Any]],
        kind: type,
        key: Callable[[Any], Any],
        label: Callable[[Any], str],
        into: dict[Any, Any],
        note: Callable[[PluginInfo, str], None],
    ) -> None:
        """Pick one registration per key: the configured plugin, else the first by name."""
        candidates: dict[Any, list[tuple[str, Any]]] = {}
        for plugin in sorted(gathered, key=lambda n: (n != BUILTIN, n)):
            if self.plugins[plugin].state == "failed":
                continue
            for item in gathered[plugin]:
                if not isinstance(item, kind):
                    continue
                candidates.setdefault(key(item), []).append((plugin, item))
        for k, offers in candidates.items():
            name = getattr(offers[0][1], "name", "")
            wanted = self._choices.get(name)
            winner = next((o for o in offers if o[0] == wanted), offers[0])
            into[k] = _with_plugin(winner[1], winner[0])
            note(self.plugins[winner[0]], label(winner[1]))
            for plugin, item in offers:
                if plugin != winner[0]:
                    self.plugins[plugin].notes.append(
                        f"{label(item)} is also provided by {winner[0]}, which wins "
                        f"(choose with [plugins.protocols] {name} = \"{plugin}\")"
                    )

    # -- look-ups ---------------------------------------------------------------------

    def protocol(self, direction: Direction, name: str) -> ProtocolProvider:
        """The provider of protocol ``name`` (in any case); a ValidationError lists the choices."""
        key = self.protocol_name(name, direction)
        if key is None:
            raise ValidationError(self._unavailable(direction, name), field="protocol")
        return self.protocols[(direction, key)]

    def protocol_name(self, name: str, direction: Direction | None = None) -> str | None:
        """The loaded protocol (of ``direction``, or of either) that ``name`` names, as its
        plugin registered it, or None. Names compare without case, since an admin types
        ``IMAP``; a name that only differs in case from two protocols names neither."""
        names = {n for d, n in self.protocols if direction is None or d is direction}
        if name in names:
            return name
        folded = [n for n in names if n.casefold() == name.casefold()]
        return folded[0] if len(folded) == 1 else None

    def _unavailable(self, direction: Direction, typed: str) -> str:
        """Why protocol ``typed`` is not there, and what brings it."""
        what = f"no {direction.value} protocol named {typed!r}"
        name = typed.lower()  # the plugins' and bundled protocols' names are lower case
        # A plugin is named after its protocol (the bundled ones are): when that plugin is
        # installed but off, say so, not "not installed". Not for a bundled plugin asked
        # for the direction it lacks (imap for outgoing).
        elsewhere = (direction, name) not in BUNDLED_PROTOCOLS and any(n == name for _, n in BUNDLED_PROTOCOLS)
        plugin = None if elsewhere or name in BUILTINS else self.plugins.get(name)
        if plugin is not None and plugin.state == "disabled":
            if self._only is not None and name not in self._only:
                return f"{what} is loaded: $MAILHOST_LOAD_PLUGINS leaves out its plugin {name}; add {name} there"
            return (f"{what} is enabled: its plugin {name} is disabled in the config file; "
                    f"`mailhost plugins enable {name}` enables it")
        if plugin is not None and plugin.state == "failed":
            return f"{what} is loaded: its plugin {name} failed to load ({plugin.error}); see `mailhost plugins list`"
        known = self.protocol_names(direction)
        dist = BUNDLED_PROTOCOLS.get((direction, name))
        if dist is not None:
            return (f"{what} is installed: install it with `pip install {dist}` "
                    f"(installed {direction.value} protocols: {', '.join(known) or 'none'})")
        if not known:
            bundled = sorted({d for (way, _), d in BUNDLED_PROTOCOLS.items() if way is direction})
            return (f"{what} is available, nor any other: install or enable a plugin that provides one, "
                    f"such as {' or '.join(bundled)}")
        return f"{what} is available; choose one of: {', '.join(known)} (or install the plugin that provides it)"

    def option_rows(self, protocol: str | None = None) -> list[dict[str, Any]]:
        """Every option the protocols declare (of protocol ``protocol`` only, when given),
        one row each, for ``mailhost plugins options`` and the web admin. A protocol that
        is not loaded is a typo to name (ValidationError), not "it declares none"."""
        if protocol is not None:
            typed, protocol = protocol, self.protocol_name(protocol)
            if protocol is None:
                raise ValidationError(f"no protocol named {typed!r} is loaded: choose one of "
                                      f"{', '.join(sorted({n for _, n in self.protocols})) or 'none installed'}",
                                      field="protocol")
        return [
            {"protocol": f"{d.value}/{n}", "plugin": p.plugin, **o.as_dict()}
            for (d, n), p in sorted(self.protocols.items(), key=lambda kv: (kv[0][1], kv[0][0].value))
            if protocol is None or n == protocol
            for o in p.options
        ]

    def protocol_names(self, direction: Direction) -> list[str]:
        """The names of the protocols available in ``direction``."""
        return sorted(n for d, n in self.protocols if d == direction)

    def action(self, name: str) -> AfterDownloadAction:
        """The after-download action ``name``; a ValidationError lists the choices."""
        try:
            return self.actions[name]
        except KeyError:
            raise ValidationError(
                f"no after-download action named {name!r}; choose one of: {', '.join(sorted(self.actions))}",
                field="after_download",
            ) from None

    def culprit(self, exc: BaseException) -> PluginInfo | None:
        """The plugin whose code raised ``exc``: the innermost frame of its traceback that
        is in a plugin's package (not the host's own plugins), if any is."""
        modules: list[str] = []
        tb = exc.__traceback__
        while tb is not None:
            modules.append(str(tb.tb_frame.f_globals.get("__name__", "")))
            tb = tb.tb_next
        for module in reversed(modules):
            for info in self.plugins.values():
                if info.name not in BUILTINS and (module == info.module or module.startswith(info.module + ".")):
                    return info
        return None

    def unexpected(self, exc: BaseException) -> str:
        """``unexpected KeyError in plugin NAME (DISTRIBUTION VERSION): MESSAGE``: an
        exception outside mailhost's error tree, naming the plugin whose code raised it, so
        that an admin knows whom to tell. Not redacted: the caller redacts."""
        info = self.culprit(exc)
        where = f" in {self.named(info.name)}" if info is not None else ""
        text = "; ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
        return f"unexpected {type(exc).__name__}{where}" + (f": {text}" if text else "")

    def named(self, plugin: str) -> str:
        """``plugin NAME (DISTRIBUTION VERSION)``: a plugin as errors name it, so that an
        admin knows whom to tell (the distribution when it has one)."""
        info = self.plugins.get(plugin)
        shown = info.as_dict() if info is not None else {}
        dist = " ".join(str(v) for v in (shown.get("distribution"), shown.get("version")) if v)
        return f"plugin {plugin}" + (f" ({dist})" if dist else "")

    @property
    def hook(self) -> Any:
        """The pluggy hook relay, for calling the event hooks."""
        return self.pm.hook


def broke_contract(plugin: str, contract: str, what: str) -> PluginError:
    """``PLUGIN broke the CONTRACT contract: WHAT (report it to the plugin's author)``: an
    answer of a plugin's code that the host cannot use, against docs/plugin_hooks.md
    (``plugin`` as errors name it: :meth:`PluginHost.named` where the host is at hand)."""
    return PluginError(f"{plugin} broke the {contract} contract: {what} (report it to the plugin's author)")


def installed_plugin_names() -> list[str]:
    """The names of the installed plugins (the host's own included), without importing any."""
    return sorted({ep.name for ep in _entry_points()} | set(BUILTINS))


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    """The entry points of the group, from stevedore's cache, none of them imported."""
    manager: NamedExtensionManager[Any] = NamedExtensionManager(
        ENTRY_POINT_GROUP, names=[], on_missing_entrypoints_callback=None
    )
    return list(manager.list_entry_points())


@functools.lru_cache(maxsize=8)
def _cached_host(
    enabled: tuple[str, ...], disabled: tuple[str, ...], choices: tuple[tuple[str, str], ...],
    only: str | None, strict: bool,
) -> PluginHost:
    return PluginHost(enabled, disabled, dict(choices), strict=strict)


def plugin_host(
    enabled: Iterable[str] = (), disabled: Iterable[str] = (), protocol_choices: dict[str, str] | None = None
) -> PluginHost:
    """The process's plugin host: discovered once per process for the same settings."""
    return _cached_host(
        tuple(sorted(enabled)), tuple(sorted(disabled)), tuple(sorted((protocol_choices or {}).items())),
        os.environ.get("MAILHOST_LOAD_PLUGINS"), _env_flag("MAILHOST_STRICT_PLUGINS"),
    )


def _with_plugin(item: Any, plugin: str) -> Any:
    if getattr(item, "plugin", None) == plugin:
        return item
    from dataclasses import replace

    return replace(item, plugin=plugin)


def _distribution_of(ep: importlib.metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None) or _declaring_distributions().get((ep.name, ep.value))
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


@functools.lru_cache(maxsize=1)
def _declaring_distributions() -> dict[tuple[str, str], importlib.metadata.Distribution]:
    """The distribution that declares each entry point of the group (stevedore's cached
    entry points do not say). This reads each distribution's entry_points.txt, where
    packages_distributions() would read every installed file list: ten times slower."""
    found: dict[tuple[str, str], importlib.metadata.Distribution] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.dist is not None:
            found.setdefault((ep.name, ep.value), ep.dist)
    return found


@functools.lru_cache(maxsize=1)
def _own_version() -> str | None:
    try:
        return importlib.metadata.version("mailhost")
    except importlib.metadata.PackageNotFoundError:
        return None


def _short(value: object) -> str:
    """``value``'s repr, cut to a length that fits a sentence."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(exc: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
