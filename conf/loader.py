"""Load an Arvados cluster config file into the frozen :class:`conf.model.Cluster`.

The file is the one ``arvados-dispatch-cloud`` reads (``/etc/arvados/config.yml`` or
``$ARVADOS_CONFIG``), layered over ``defaults.yml`` the way Arvados layers its own defaults: maps
merge key by key, lists are replaced, ``SAMPLE`` keys and null values are dropped. Sections this
dispatcher does not use (API, Collections, Volumes, Workbench, ...) are accepted and ignored, so a
full real Arvados config loads.

Every problem is a :class:`ConfigError` whose text is one line naming the file and the key path,
so an operator sees ``/etc/arvados/config.yml: Clusters.zzzzz.InstanceTypes.m5.RAM: "16 gigs" is
not a size (unknown unit "gigs")`` instead of a traceback. Secrets (tokens, the private key) are
never echoed.

The Cluster holds *effective* values: the Go pool's fallbacks for zero durations, and ``true`` for
an empty BootProbeCommand, are applied here so no consumer has to repeat them. ``Cluster.raw`` is
the other view: the whole config as Go's loader would hold it (Arvados' complete defaults from
``arvados_defaults.yml`` under ours and the site's, in Go's JSON types, see :mod:`conf.gotypes`),
which is what crunch-run receives on stdin.

Deliberate differences from Arvados:

* An instance type must state ``Price`` and ``RAM``. Arvados would fill in its SAMPLE defaults
  ($0.10/h, 128MiB), so a misspelled key silently makes a tiny, cheap type the scheduler prefers.
* ``Driver`` must be one this dispatcher implements (azure, local, stub); the Arvados default
  ``ec2`` is rejected, so a site file has to name its driver.
* Negative counts, sizes and durations are errors (Go would accept some, then misbehave).
* ``Services.DispatchCloud.InternalURLs`` defaults to ``http://localhost:9006``; URLs a site lists
  replace that default instead of being added to it.
* ``DispatchPrivateKey`` is stored as PEM text: a ``file:///`` URL is read at load time, and
  refused if the file is larger than a key can be or readable by group or others.
* YAML aliases may not expand the document past :data:`MAX_EXPANDED_NODES` nodes (a "billion
  laughs" file is refused instead of hanging the loader).
* No message ever holds the value of a key that holds a secret (:func:`is_secret_key`), whatever
  its YAML type.
"""

from __future__ import annotations

import datetime
import functools
import io
import json
import logging
import math
import os
import re
import stat
from collections.abc import Mapping
from importlib import resources

import yaml

from conf.gotypes import GoTypeError, to_go_json
from conf.drivers import IMPLEMENTED, NOT_IMPLEMENTED, local_default_instance_type
from conf.model import GPU, LOG_FORMATS, LOG_LEVELS, CloudVMs, Cluster, Containers, InstanceType, freeze
from conf.units import parse_duration, parse_size
from conf.urls import check_listen_url, check_pg_address, check_pg_option, check_url, shown

DEFAULT_PATH = "/etc/arvados/config.yml"
log = logging.getLogger(__name__)

_CLUSTER_ID = re.compile(r"[a-z0-9]{5}")
_GPU_STACKS = ("", "cuda", "rocm")
_DEFAULT_INCLUDED_SCRATCH = 16 * 10**9
# Pool fallbacks (Arvados worker/pool.go): a zero duration means "use this".
_DURATION_FALLBACKS = {
    "ProbeInterval": 10.0,
    "SyncInterval": 60.0,
    "TimeoutIdle": 60.0,
    "TimeoutBooting": 600.0,
    "TimeoutProbe": 600.0,
    "TimeoutShutdown": 10.0,
    "TimeoutTERM": 120.0,
    "TimeoutSignal": 5.0,
    "TimeoutStaleRunLock": 5.0,
}
_DEFAULT_MAX_PROBES_PER_SECOND = 10
# Keys of an InstanceTypes entry and of its GPU section ("Scratch" is known but ignored).
_INSTANCE_TYPE_KEYS = ("ProviderType", "VCPUs", "RAM", "Scratch", "IncludedScratch", "AddedScratch",
                       "Price", "Preemptible", "GPU")
_GPU_KEYS = ("Stack", "DriverVersion", "HardwareTarget", "DeviceCount", "VRAM")
# Maps whose site value replaces the default instead of merging into it (when non-empty).
_REPLACED = {("Services", "DispatchCloud", "InternalURLs")}
_REQUIRED = object()
# A real cluster config is a few thousand nodes; aliases may not blow it up past this.
MAX_EXPANDED_NODES = 100_000
# A private key file is a few KiB; anything larger (or /dev/zero) is not one.
MAX_KEY_FILE = 64 << 10
_SECRET_KEY = re.compile(r"(Token|Secret|SecretKey|AccessKey|PrivateKey|SigningKey|Password|Passphrase)$")


def is_secret_key(key) -> bool:
    """Whether a config key holds a secret (ManagementToken, ClientSecret, SecretAccessKey, ...)."""
    return isinstance(key, str) and bool(_SECRET_KEY.search(key))


class ConfigError(Exception):
    """A config problem, as one line: ``<file>: <key path>: <what is wrong>``."""

    def __init__(self, source: str, key: str, reason: str):
        self.source, self.key, self.reason = source, key, reason
        super().__init__(str(self))

    def __str__(self) -> str:
        text = ": ".join(p for p in (self.source, self.key, self.reason) if p)
        return re.sub(r"\s*[\r\n]+\s*", " ", text)  # one line, whatever the parts hold


def default_path() -> str:
    """``$ARVADOS_CONFIG`` if set and non-empty, else ``/etc/arvados/config.yml``, as Arvados does."""
    return os.environ.get("ARVADOS_CONFIG") or DEFAULT_PATH


def load(path: str | None = None, cluster_id: str | None = None) -> Cluster:
    """Read and validate the config file at ``path`` (default: :func:`default_path`)."""
    path = os.fspath(path) if path is not None else default_path()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    return load_text(text, source=path, cluster_id=cluster_id)


def load_text(text: str, source: str = "<string>", cluster_id: str | None = None) -> Cluster:
    """Like :func:`load`, for config text already in memory; ``source`` names it in messages."""
    try:
        doc = _parse_yaml(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(source, where, f"invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(source, "", f"invalid YAML: {e}") from None
    except _TooBig as e:
        raise ConfigError(source, "", str(e)) from None
    except (ValueError, OverflowError, RecursionError) as e:  # e.g. a 30,000-digit integer
        raise ConfigError(source, "", f"invalid YAML: a value cannot be read ({type(e).__name__})") from None
    cid, site = _pick_cluster(doc, source, cluster_id)
    merged = merge(_defaults(), clean(site))
    return _Builder(source, cid).build(merged)


class _TooBig(Exception):
    pass


def _parse_yaml(text: str):
    """safe_load, refusing a document whose aliases expand it past MAX_EXPANDED_NODES.

    Aliases share nodes, so the composed graph stays small while everything that walks the
    loaded value (merging, freezing, JSON) would visit each alias's target again; the expanded
    size is counted on the graph, once per node (memoised), before anything is constructed.
    """
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(root) -> int:
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_path:
            raise _TooBig("YAML alias refers to itself (a recursive document is not a config)")
        on_path.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                total += size(k) + size(v)
                if total > MAX_EXPANDED_NODES:
                    break
        elif isinstance(node, yaml.SequenceNode):
            for v in node.value:
                total += size(v)
                if total > MAX_EXPANDED_NODES:
                    break
        on_path.discard(key)
        if total > MAX_EXPANDED_NODES:
            raise _TooBig(f"YAML aliases expand the document past {MAX_EXPANDED_NODES} nodes")
        sizes[key] = total
        return total

    return size(root)


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """safe_load that rejects a key given twice in one mapping, as Go's YAML decoder does:
    otherwise a second ``Containers:`` silently discards the first."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)):
                    continue  # the base class reports unhashable keys
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {_show(key)} appears twice in one mapping", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


# --- layering ----------------------------------------------------------------------------------

@functools.cache
def _defaults_text() -> str:
    return resources.files("conf").joinpath("defaults.yml").read_text(encoding="utf-8")


def _defaults() -> dict:
    """The default cluster section (``xxxxx``), parsed afresh so callers may mutate it."""
    return yaml.safe_load(_defaults_text())["Clusters"]["xxxxx"]


@functools.cache
def _arvados_defaults_json() -> str:
    text = resources.files("conf").joinpath("arvados_defaults.yml").read_text(encoding="utf-8")
    return json.dumps(yaml.load(text, Loader=_StrictLoader)["Clusters"]["xxxxx"])  # noqa: S506


def arvados_defaults() -> dict:
    """Every key of Arvados' config.default.yml with its value (SAMPLE entries included); a fresh copy."""
    return json.loads(_arvados_defaults_json())


def remove_sample_keys(v):
    """Drop ``SAMPLE`` keys at every level, as Go's loader does to its defaults."""
    if isinstance(v, Mapping):
        return {k: remove_sample_keys(x) for k, x in v.items() if k != "SAMPLE"}
    return v


def clean(v):
    """Drop ``SAMPLE`` keys and null values, recursively, as Arvados does before decoding."""
    if isinstance(v, Mapping):
        return {k: clean(x) for k, x in v.items() if k != "SAMPLE" and x is not None}
    if isinstance(v, list):
        return [clean(x) for x in v]
    return v


def merge(base: Mapping, over: Mapping, path: tuple = ()) -> dict:
    """``over`` on top of ``base``: maps merge recursively, anything else (lists too) replaces."""
    out = dict(base)
    for k, v in over.items():
        b = base.get(k)
        here = path + (k,)
        if isinstance(b, Mapping) and isinstance(v, Mapping) and not (here in _REPLACED and v):
            out[k] = merge(b, v, here)
        else:
            out[k] = v
    return out


def _pick_cluster(doc, source: str, wanted: str | None) -> tuple[str, dict]:
    if doc is None:
        raise ConfigError(source, "", "empty file: expected a Clusters section")
    if not isinstance(doc, Mapping):
        raise ConfigError(source, "", f"expected a mapping with a Clusters section, got {_kind(doc)}")
    clusters = doc.get("Clusters")
    if clusters is None:
        raise ConfigError(source, "Clusters", "missing (the file must have a Clusters section)")
    if not isinstance(clusters, Mapping):
        raise ConfigError(source, "Clusters", f"expected a mapping of cluster ids, got {_kind(clusters)}")
    for cid in clusters:
        if not isinstance(cid, str) or not _CLUSTER_ID.fullmatch(cid):
            raise ConfigError(source, f"Clusters.{cid}",
                              f"cluster id {_show(cid)} must be 5 lowercase letters or digits")
    ids = ", ".join(sorted(clusters)) or "none"
    if wanted is not None:
        if wanted not in clusters:
            raise ConfigError(source, "Clusters", f"no cluster {_show(wanted)} (found: {ids})")
        cid = wanted
    elif len(clusters) != 1:
        if not clusters:
            raise ConfigError(source, "Clusters", "no cluster defined")
        raise ConfigError(source, "Clusters", f"holds {len(clusters)} clusters ({ids}): choose one "
                                              "(check-config --cluster ID)")
    else:
        (cid,) = clusters
    site = clusters[cid]
    if site is None:
        site = {}
    if not isinstance(site, Mapping):
        raise ConfigError(source, f"Clusters.{cid}", f"expected a mapping, got {_kind(site)}")
    return cid, site


# --- values ------------------------------------------------------------------------------------

def _kind(v) -> str:
    if isinstance(v, Mapping):
        return "a mapping"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, bool):
        return f"{str(v).lower()}"
    if isinstance(v, (int, float)):
        return f"the number {_show(v)}"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (datetime.date, datetime.time)):
        return "a date/time"
    return type(v).__name__


def _not_a_string(v, secret: bool = False) -> str:
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    hint = " (put it in quotes)" if number else ""
    return f"expected a string, got {'a number' if number and secret else _kind(v)}{hint}"


def _show(v, limit: int = 60) -> str:
    """A value as it would be written in JSON, on one line and cut short."""
    text = json.dumps(v, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _jsonable(v):
    """The merged config as JSON-safe values: YAML can yield dates and non-string keys."""
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class _Section:
    """Typed, key-path-aware access to one mapping of the merged config."""

    def __init__(self, builder: _Builder, path: str, data: Mapping):
        self.b, self.path, self.data = builder, path, data

    def key(self, k: str) -> str:
        return f"{self.path}.{k}"

    def fail(self, k: str, reason: str):
        if is_secret_key(k):
            v = self.data.get(k) if isinstance(self.data, Mapping) else None
            if (isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v)
                    and not str(v).startswith("file://")):  # a path to a secret is not one
                reason = reason.replace(str(v), "(secret)")
        raise ConfigError(self.b.source, self.key(k), reason)

    def _get(self, k, default):
        if k in self.data:
            return self.data[k]
        if default is _REQUIRED:
            self.fail(k, "is required")
        return default

    def warn_unknown(self, known) -> None:
        known = set(known)
        lower = {k.lower(): k for k in known}
        for k in self.data:
            if k in known:
                continue
            hint = lower.get(k.lower()) if isinstance(k, str) else None
            self.b.warn(self.key(k), "deprecated or unknown config entry"
                        + (f" (did you mean {hint}?)" if hint else ""))

    def section(self, k: str, default=_REQUIRED) -> _Section:
        v = self._get(k, default)
        if not isinstance(v, Mapping):
            self.fail(k, f"expected a mapping, got {_kind(v)}")
        return _Section(self.b, self.key(k), v)

    def str(self, k: str, default=_REQUIRED, numbers_ok: bool = False) -> str:
        v = self._get(k, default)
        if numbers_ok and isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        if not isinstance(v, str):
            self.fail(k, _not_a_string(v, secret=is_secret_key(k)))
        return v

    def bool(self, k: str, default=_REQUIRED) -> bool:
        v = self._get(k, default)
        if not isinstance(v, bool):
            self.fail(k, f"expected true or false, got {_kind(v) if not isinstance(v, str) else _show(v)}")
        return v

    def int(self, k: str, default=_REQUIRED, minimum: int = 0) -> int:
        v = self._get(k, default)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            got = _show(v) if isinstance(v, (str, float)) else _kind(v)
            self.fail(k, f"expected a whole number, got {got}")
        if v < minimum:
            self.fail(k, f"{v} is too small (minimum {minimum})")
        return v

    def float(self, k: str, default=_REQUIRED, minimum: float = 0.0, maximum: float | None = None) -> float:
        v = self._get(k, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            got = _show(v) if isinstance(v, (str, float)) else _kind(v)
            self.fail(k, f"expected a number, got {got}")
        if v < minimum or (maximum is not None and v > maximum):
            bounds = f"between {minimum:g} and {maximum:g}" if maximum is not None else f"at least {minimum:g}"
            self.fail(k, f"{v:g} is out of range (must be {bounds})")
        return float(v)

    def duration(self, k: str, default=_REQUIRED) -> float:
        return self._quantity(k, default, parse_duration, "duration", '"10s"')

    def size(self, k: str, default=_REQUIRED) -> int:
        return self._quantity(k, default, parse_size, "size", '"16GiB"')

    def _quantity(self, k: str, default, parse, what: str, example: str):
        """A Go-syntax duration or size: parsed, never negative, errors naming the key."""
        v = self._get(k, default)
        if isinstance(v, (Mapping, list)):
            self.fail(k, f"expected a {what} like {example}, got {_kind(v)}")
        try:
            q = parse(v)
        except ValueError as e:
            self.fail(k, f"{_show(v)} is not a {what} ({e})")
        if q < 0:
            self.fail(k, f"{_show(v)} is negative")
        return q

    def str_list(self, k: str, default=_REQUIRED) -> tuple[str, ...]:
        v = self._get(k, default)
        if not isinstance(v, list):
            self.fail(k, f"expected a list of strings, got {_kind(v)}")
        for i, x in enumerate(v):
            if not isinstance(x, str):
                raise ConfigError(self.b.source, f"{self.key(k)}[{i}]", _not_a_string(x))
        return tuple(v)

    def str_map(self, k: str, default=_REQUIRED) -> Mapping:
        sec = self.section(k, default)
        for name, x in sec.data.items():
            if not isinstance(name, str):
                sec.fail(str(name), "key must be a string")
            if not isinstance(x, str):
                sec.fail(name, _not_a_string(x))
        return freeze(dict(sec.data))


class _Builder:
    """Turns one merged cluster mapping into a Cluster, collecting warnings as log records."""

    def __init__(self, source: str, cluster_id: str):
        self.source, self.cluster_id = source, cluster_id

    def warn(self, key: str, msg: str) -> None:
        log.warning("%s: %s", key, msg, extra={"ConfigFile": self.source, "ConfigKey": key})

    def build(self, merged: dict) -> Cluster:
        top = _Section(self, f"Clusters.{self.cluster_id}", merged)
        defaults = _defaults()
        services = top.section("Services")
        dispatch = services.section("DispatchCloud")
        dispatch.warn_unknown(defaults["Services"]["DispatchCloud"])
        controller = services.section("Controller")
        tls = top.section("TLS")
        containers = self._containers(top.section("Containers"), defaults["Containers"])
        cluster = Cluster(
            cluster_id=self.cluster_id,
            system_root_token=top.str("SystemRootToken"),
            management_token=top.str("ManagementToken"),
            controller_url=self._url(controller, "ExternalURL", empty_ok=True),
            dispatch_urls=(internal := self._internal_urls(dispatch))[0],
            dispatch_listen=internal[1],
            tls_insecure=tls.bool("Insecure"),
            postgresql_connection=self._pg_connection(top.section("PostgreSQL")),
            api_max_concurrent_requests=top.section("API", {}).int("MaxConcurrentRequests", 64),
            log_level=self._log_level(top.section("SystemLogs")),
            log_format=self._log_format(top.section("SystemLogs")),
            containers=containers,
            instance_types=freeze(types := self._instance_types(top, containers)),
            source=self.source,
            raw=freeze(self._go_cluster(merged, types)),
        )
        if not cluster.management_token:
            self.warn(top.key("ManagementToken"),
                      "is empty: the management API and /metrics will refuse every request")
        # (an empty SystemRootToken is conf.runcheck's error for run and check-config; the other
        # commands do not use it)
        return cluster

    # -- PostgreSQL, SystemLogs -----------------------------------------------------------------

    @staticmethod
    def _pg_connection(sec: _Section) -> Mapping:
        conn = sec.section("Connection")
        out = {}
        for k, v in conn.data.items():
            if not isinstance(k, str):
                conn.fail(str(k), "key must be a string")
            if isinstance(v, int) and not isinstance(v, bool):
                v = str(v)  # port: 5432
            if not isinstance(v, str):
                conn.fail(k, _not_a_string(v))
            if not v:
                continue  # Arvados drops empty values and lower-cases the keys
            key = k.lower()
            try:  # what the dispatch lock would trip over, found now
                check_pg_option(key)
                if key in ("host", "port"):
                    check_pg_address(key, v)
            except ValueError as e:
                conn.fail(k, f"{_show(v)} {e}" if key in ("host", "port") else str(e))
            out[key] = v
        return freeze(out)

    @staticmethod
    def _log_level(sec: _Section) -> str:
        v = sec.str("LogLevel").lower()
        level = {"warn": "warning", "panic": "error", "fatal": "error", "trace": "debug"}.get(v, v)
        if level not in LOG_LEVELS:
            sec.fail("LogLevel", f"{_show(v)} is not a log level (expected one of {', '.join(LOG_LEVELS)})")
        return level

    @staticmethod
    def _log_format(sec: _Section) -> str:
        v = sec.str("Format").lower()
        if v and v not in LOG_FORMATS:
            sec.fail("Format", f"{_show(v)} is not a log format (expected json or text)")
        return v

    def _go_cluster(self, merged: dict, types: Mapping) -> dict:
        """The whole cluster config as Go's loader holds it and crunch-run decodes it: Arvados'
        defaults (SAMPLE entries dropped) under ours and the site's, the instance types as loaded
        (preemptible variants and the local default included), implicit storage classes, every
        value in its Go JSON type (:mod:`conf.gotypes`)."""
        full = merge(remove_sample_keys(arvados_defaults()), _jsonable(merged))
        full["InstanceTypes"] = {name: it.arvados_json() for name, it in types.items()}
        volumes = full.get("Volumes") if isinstance(full.get("Volumes"), Mapping) else {}
        if not full.get("StorageClasses") and not any(
                isinstance(v, Mapping) and v.get("StorageClasses") for v in volumes.values()):
            # Go's setImplicitStorageClasses
            full["StorageClasses"] = {"default": {"Default": True, "Priority": 0}}
            full["Volumes"] = {k: {**v, "StorageClasses": {"default": True}} if isinstance(v, Mapping) else v
                               for k, v in volumes.items()}
        try:
            return to_go_json(full)
        except GoTypeError as e:
            raise ConfigError(self.source, f"Clusters.{self.cluster_id}.{e.key}", e.reason) from None

    # -- Services -------------------------------------------------------------------------------

    def _url(self, sec: _Section, k: str, empty_ok: bool) -> str:
        url = sec.str(k)
        if url or not empty_ok:
            self._check_url(sec, k, url)
        return url

    @staticmethod
    def _check_url(sec: _Section, k: str, url: str, listen: bool = False) -> None:
        """One rule set for every URL (:mod:`conf.urls`); the message shows no user info."""
        try:
            if listen:
                check_listen_url(url)
            else:
                check_url(url, path=False)
        except ValueError as e:
            sec.fail(k, f"{_show(shown(url))} {e}")

    def _internal_urls(self, dispatch: _Section) -> tuple[tuple[str, ...], Mapping]:
        """The InternalURLs, and the ListenURL of those that have one (the others are served on
        themselves). Either must be one this process can listen on (plain http, no path), or
        ``run`` would fail."""
        urls = dispatch.section("InternalURLs")
        listen = {}
        for url, extra in urls.data.items():
            if not isinstance(url, str):
                urls.fail(str(url), "expected a URL string as the key")
            self._check_url(dispatch, "InternalURLs", url)
            if not isinstance(extra, Mapping):
                urls.fail(shown(url), f"expected a mapping (e.g. {{}} or {{ListenURL: ...}}), got {_kind(extra)}")
            entry = _Section(self, urls.key(shown(url)), extra)
            entry.warn_unknown(("ListenURL",))
            if "ListenURL" in extra and entry.str("ListenURL"):
                self._check_url(entry, "ListenURL", extra["ListenURL"], listen=True)
                listen[url] = extra["ListenURL"]
            else:
                try:
                    check_listen_url(url)
                except ValueError as e:
                    dispatch.fail("InternalURLs", f"{_show(shown(url))} cannot be listened on: {e}; "
                                  "give it a ListenURL")
        if not urls.data:
            dispatch.fail("InternalURLs", "is empty: the management API needs a URL to listen on")
        return tuple(sorted(urls.data)), freeze(listen)

    # -- Containers -----------------------------------------------------------------------------

    def _containers(self, sec: _Section, defaults: Mapping) -> Containers:
        sec.warn_unknown(defaults)
        vms = sec.section("CloudVMs")
        vms.warn_unknown(defaults["CloudVMs"])
        return Containers(
            cloud_vms=self._cloud_vms(vms),
            default_keep_cache_ram=sec.size("DefaultKeepCacheRAM"),
            max_dispatch_attempts=sec.int("MaxDispatchAttempts"),
            always_use_preemptible_instances=sec.bool("AlwaysUsePreemptibleInstances"),
            preemptible_price_factor=sec.float("PreemptiblePriceFactor"),
            maximum_price_factor=sec.float("MaximumPriceFactor"),
            dispatch_private_key=self._private_key(sec, "DispatchPrivateKey"),
            stale_lock_timeout=sec.duration("StaleLockTimeout"),
            crunch_run_command=sec.str("CrunchRunCommand"),
            crunch_run_arguments_list=sec.str_list("CrunchRunArgumentsList"),
            reserve_extra_ram=sec.size("ReserveExtraRAM"),
            runtime_engine=sec.str("RuntimeEngine"),
            local_keep_blob_buffers_per_vcpu=sec.int("LocalKeepBlobBuffersPerVCPU"),
        )

    def _cloud_vms(self, sec: _Section) -> CloudVMs:
        durations = {k: sec.duration(k) or fallback for k, fallback in _DURATION_FALLBACKS.items()}
        runner_binary = sec.str("DeployRunnerBinary")
        if runner_binary == "/proc/self/exe":
            self.warn(sec.key("DeployRunnerBinary"), "/proc/self/exe (Arvados' default: its own binary) "
                      "holds no crunch-run here and is ignored: CrunchRunCommand on the image is used; "
                      "name a crunch-run file to deploy it")
            runner_binary = ""
        elif runner_binary:
            if not runner_binary.startswith("/"):
                sec.fail("DeployRunnerBinary", f"{_show(runner_binary)} must be an absolute path")
            if not os.path.isfile(runner_binary) or not os.access(runner_binary, os.R_OK):
                sec.fail("DeployRunnerBinary", f"{_show(runner_binary)} is not a readable file on this host")
        return CloudVMs(
            enable=sec.bool("Enable"),
            driver=self._driver(sec, "Driver"),
            driver_parameters=freeze(dict(sec.section("DriverParameters").data)),
            ssh_port=sec.str("SSHPort", numbers_ok=True),
            poll_interval=sec.duration("PollInterval"),
            boot_probe_command=sec.str("BootProbeCommand") or "true",
            probe_interval=durations["ProbeInterval"],
            max_probes_per_second=sec.int("MaxProbesPerSecond") or _DEFAULT_MAX_PROBES_PER_SECOND,
            timeout_signal=durations["TimeoutSignal"],
            timeout_stale_run_lock=durations["TimeoutStaleRunLock"],
            timeout_term=durations["TimeoutTERM"],
            max_cloud_ops_per_second=sec.int("MaxCloudOpsPerSecond"),
            max_concurrent_instance_create_ops=sec.int("MaxConcurrentInstanceCreateOps"),
            max_instances=sec.int("MaxInstances"),
            max_running_containers_per_instance=sec.int("MaxRunningContainersPerInstance"),
            initial_quota_estimate=sec.int("InitialQuotaEstimate"),
            supervisor_fraction=sec.float("SupervisorFraction", maximum=1.0),
            sync_interval=durations["SyncInterval"],
            timeout_idle=durations["TimeoutIdle"],
            timeout_booting=durations["TimeoutBooting"],
            timeout_probe=durations["TimeoutProbe"],
            timeout_shutdown=durations["TimeoutShutdown"],
            image_id=sec.str("ImageID"),
            instance_init_command=sec.str("InstanceInitCommand"),
            deploy_runner_binary=runner_binary,
            deploy_runner_directory=sec.str("DeployRunnerDirectory"),
            deploy_public_key=sec.bool("DeployPublicKey"),
            resource_tags=sec.str_map("ResourceTags"),
            tag_key_prefix=sec.str("TagKeyPrefix"),
        )

    @staticmethod
    def _driver(sec: _Section, k: str) -> str:
        name = sec.str(k)
        supported = ", ".join(sorted(IMPLEMENTED))
        if name in NOT_IMPLEMENTED:
            sec.fail(k, f"driver {_show(name)} is not supported by this dispatcher (supported: {supported})")
        if name not in IMPLEMENTED:
            sec.fail(k, f"unknown driver {_show(name)} (supported: {supported})")
        return name

    def _private_key(self, sec: _Section, k: str) -> str:
        value = sec.str(k)
        if not value:
            return ""
        pem = value
        if value.startswith("file://"):
            path = value[len("file://"):]
            if not path.startswith("/"):
                sec.fail(k, f"{_show(value)} must be file:///absolute/path")
            pem = self._read_key_file(sec, k, path)
            what = path
        else:
            what = "the value"
        reason = _ssh_key_problem(pem)
        if reason:
            sec.fail(k, f"{what} is not a valid SSH private key ({reason})")
        return pem

    @staticmethod
    def _read_key_file(sec: _Section, k: str, path: str) -> str:
        """At most MAX_KEY_FILE bytes of a regular file that only its owner can read."""
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    sec.fail(k, f"{path} is not a regular file")
                if st.st_mode & 0o044:
                    sec.fail(k, f"{path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                                f"run: chmod 600 {path}")
                data = f.read(MAX_KEY_FILE + 1)
        except OSError as e:
            sec.fail(k, f"cannot read {path}: {e.strerror or e}")
        if len(data) > MAX_KEY_FILE:
            sec.fail(k, f"{path} is larger than {MAX_KEY_FILE // 1024} KiB: not an SSH private key")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            sec.fail(k, f"{path} is not a valid SSH private key")

    # -- InstanceTypes --------------------------------------------------------------------------

    def _instance_types(self, top: _Section, containers: Containers) -> dict[str, InstanceType]:
        v = top.data.get("InstanceTypes", {})
        if isinstance(v, list):
            top.fail("InstanceTypes", "must be a mapping of type name to type (the list form is not supported)")
        sec = top.section("InstanceTypes")
        types = {}
        for name in sec.data:
            if not isinstance(name, str) or not name:
                sec.fail(str(name), "instance type name must be a non-empty string")
            types[name] = self._instance_type(sec.section(name), name)
        if not types and containers.cloud_vms.driver == "local":
            types = self._local_default_type(top, containers)
        factor = containers.preemptible_price_factor
        if factor > 0:
            for name, it in list(types.items()):
                if it.preemptible:
                    continue
                variant = InstanceType(
                    name=f"{name}.preemptible", provider_type=it.provider_type, vcpus=it.vcpus, ram=it.ram,
                    included_scratch=it.included_scratch, added_scratch=it.added_scratch,
                    price=it.price * factor, preemptible=True, gpu=it.gpu)
                existing = types.get(variant.name)
                if existing is None:
                    types[variant.name] = variant
                elif existing != variant:
                    self.warn(sec.key(variant.name), "already exists, so no preemptible variant of "
                                                     f"{name} is added automatically")
        return types

    def _local_default_type(self, top: _Section, containers: Containers) -> dict[str, InstanceType]:
        """Like Arvados' loopback driver: with Driver local and no InstanceTypes, one type sized
        from this host (cores, memory, free disk under StateDir)."""
        from conf.model import thaw
        try:
            found = local_default_instance_type(thaw(containers.cloud_vms.driver_parameters))
        except ValueError as e:
            top.fail("Containers.CloudVMs.DriverParameters", str(e))
        return {name: InstanceType(name=name, provider_type=d["ProviderType"], vcpus=int(d["VCPUs"]),
                                   ram=int(d["RAM"]), included_scratch=int(d["IncludedScratch"]),
                                   added_scratch=int(d.get("AddedScratch", 0)), price=float(d["Price"]))
                for name, d in found.items()}

    def _instance_type(self, sec: _Section, name: str) -> InstanceType:
        sec.warn_unknown(_INSTANCE_TYPE_KEYS)
        if "Scratch" in sec.data:
            self.warn(sec.key("Scratch"), "is ignored: scratch is IncludedScratch + AddedScratch")
        return InstanceType(
            name=name,
            provider_type=sec.str("ProviderType", "") or name,
            vcpus=sec.int("VCPUs", 1, minimum=1),
            ram=self._positive_size(sec, "RAM"),
            included_scratch=sec.size("IncludedScratch", _DEFAULT_INCLUDED_SCRATCH),
            added_scratch=sec.size("AddedScratch", 0),
            price=sec.float("Price"),
            preemptible=sec.bool("Preemptible", False),
            gpu=self._gpu(sec.section("GPU", {})),
        )

    @staticmethod
    def _positive_size(sec: _Section, k: str) -> int:
        n = sec.size(k)
        if n == 0:
            sec.fail(k, "must be more than 0")
        return n

    @staticmethod
    def _gpu(sec: _Section) -> GPU:
        sec.warn_unknown(_GPU_KEYS)
        gpu = GPU(
            stack=sec.str("Stack", ""),
            driver_version=sec.str("DriverVersion", ""),
            hardware_target=sec.str("HardwareTarget", ""),
            device_count=sec.int("DeviceCount", 0),
            vram=sec.size("VRAM", 0),
        )
        if gpu.stack not in _GPU_STACKS:
            sec.fail("Stack", f"{_show(gpu.stack)} is not one of \"cuda\", \"rocm\" or \"\"")
        if gpu.device_count > 0:
            try:
                float(gpu.driver_version)
            except ValueError:
                sec.fail("DriverVersion", f"{_show(gpu.driver_version)} is not a version number like \"12.4\"")
        return gpu


def _ssh_key_problem(pem: str) -> str:
    """Why ``pem`` is not a usable SSH private key, or "" if it is. Never includes the key."""
    import paramiko  # here, not at module top: only configs with a key need it

    encrypted = False
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            cls.from_private_key(io.StringIO(pem))
            return ""
        except paramiko.PasswordRequiredException:
            encrypted = True
        except Exception:  # noqa: BLE001 - any parse failure just means "not this key type"
            continue
    return "it is passphrase-protected" if encrypted else "not an Ed25519, ECDSA or RSA key in PEM/OpenSSH form"
