"""Redis clients and Celery's Redis settings from one URL: the one place dm reads ``DM_REDIS_URL``.

Three forms are accepted:

- ``redis://[[user]:password@]host:port[/db]``: one server;
- ``rediss://...`` the same over TLS, with optional ``ssl_cert_reqs`` (``required``, the
  default, ``optional`` or ``none``), ``ssl_ca_certs``, ``ssl_certfile`` and ``ssl_keyfile``
  query parameters (paths to PEM files);
- ``sentinel://[[user]:password@]host1:port1,host2:port2,.../master[/db]``: the Sentinels
  that watch the master named ``master``; the password is the master's (and its replicas');
  a ``sentinel_password`` query parameter is the Sentinels' own, when they require one.

Every consumer gets what it understands: redis-py a client that asks the Sentinels where
the master is on each new connection (``Sentinel.master_for``), so it follows a failover;
Celery's broker and result backend Kombu's ``sentinel://h1:p1;sentinel://h2:p2/db`` with the
``master_name`` transport option, or, for ``rediss://``, the TLS options that Kombu and
Celery's result backend otherwise want repeated (``broker_use_ssl``, ``redis_backend_use_ssl``).
"""

from __future__ import annotations

import ssl
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis
from redis.sentinel import Sentinel

from dm.errors import ConfigError

#: the port of a Sentinel named without one
SENTINEL_PORT = 26379
#: the TLS query parameters of a ``rediss://`` URL (redis-py's keyword arguments of the same names)
SSL_PARAMS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
#: the transport options that only a Sentinel URL sets
_SENTINEL_OPTIONS = ("master_name", "sentinel_kwargs")
#: seconds a Sentinel may take to answer where the master is (it answers from memory)
SENTINEL_TIMEOUT = 2.0

FORMS = (
    "redis://[:password@]host:port/db, rediss://[:password@]host:port/db?ssl_ca_certs=/path/ca.pem, "
    "or sentinel://[:password@]host1:26379,host2:26379,host3:26379/<master name>[/db]"
)


@dataclass(frozen=True)
class RedisTarget:
    """What a Redis URL names: one server, or the Sentinels of a master."""

    url: str
    #: (host, port) of each Sentinel; empty for one server
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    #: redis-py's TLS keyword arguments (``ssl_cert_reqs`` as an ``ssl.VerifyMode``); empty without TLS
    tls: dict[str, Any] = field(default_factory=dict)

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)


def parse(url: str) -> RedisTarget:
    """Read a Redis URL; ConfigError with the accepted forms when it is none of them."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "sentinel":
        return _parse_sentinel(url)
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"DM_REDIS_URL must be one of {FORMS}; got a URL of scheme {scheme or '(none)'!r}")
    query = parse_qs(urlsplit(url).query)
    tls: dict[str, Any] = {}
    if scheme == "rediss":
        tls = {name: query[name][-1] for name in SSL_PARAMS if query.get(name)}
        reqs = str(tls.get("ssl_cert_reqs", "required")).lower().removeprefix("cert_")
        if reqs not in _CERT_REQS:
            raise ConfigError(f"ssl_cert_reqs in DM_REDIS_URL must be required, optional or none, not {reqs!r}")
        tls["ssl_cert_reqs"] = _CERT_REQS[reqs]
    elif any(name in query for name in SSL_PARAMS):
        raise ConfigError("DM_REDIS_URL has TLS parameters but the scheme redis://: write rediss:// for TLS")
    return RedisTarget(url, tls=tls)


def _parse_sentinel(url: str) -> RedisTarget:
    if ";" in url:
        raise ConfigError(
            "DM_REDIS_URL: write the Sentinels as one URL with the master's name, "
            "sentinel://[:password@]host1:26379,host2:26379/<master name>[/db], not Kombu's ';' list"
        )
    rest = url.split("://", 1)[1]
    rest, _, query_text = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        if not host or (port and not port.isdigit()):
            raise ConfigError(f"DM_REDIS_URL: {item!r} is not host:port of a Sentinel; the form is {FORMS}")
        sentinels.append((host.strip("[]"), int(port) if port else SENTINEL_PORT))
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ConfigError(f"DM_REDIS_URL: a sentinel:// URL names its master after the hosts: {FORMS}")
    query = parse_qs(query_text)
    if any(name in query for name in SSL_PARAMS):
        raise ConfigError("DM_REDIS_URL: TLS through Sentinel is not supported yet; use rediss:// to one server")
    unknown = set(query) - {"sentinel_password"}
    if unknown:
        raise ConfigError(f"DM_REDIS_URL: unknown parameter(s) {sorted(unknown)}; a sentinel:// URL takes only "
                          "sentinel_password")  # fmt: skip
    return RedisTarget(
        url,
        sentinels=tuple(sentinels),
        master=unquote(parts[0]),
        db=int(parts[1]) if len(parts) == 2 else 0,
        username=username,
        password=password,
        sentinel_password=query["sentinel_password"][-1] if "sentinel_password" in query else None,
    )


def client(url: str, **kwargs: Any) -> redis.Redis:
    """A redis-py client for `url`, with `kwargs` for its connections (timeouts, retry,
    client_name, decode_responses, ...). For Sentinels, a client of the current master:
    each new connection asks the Sentinels where it is, so it follows a failover."""
    target = parse(url)
    if not target.is_sentinel:
        # rediss://: redis-py reads the same TLS query parameters from the URL
        return redis.Redis.from_url(url, **kwargs)
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=_sentinel_kwargs(target, kwargs))
    credentials = {"username": target.username, "password": target.password}
    return sentinel.master_for(target.master, db=target.db, **{k: v for k, v in credentials.items() if v}, **kwargs)


def _sentinel_kwargs(target: RedisTarget, kwargs: dict[str, Any]) -> dict[str, Any]:
    """How to talk to the Sentinels themselves: short timeouts, their own password if any."""
    timeout = min(float(kwargs.get("socket_timeout") or SENTINEL_TIMEOUT), SENTINEL_TIMEOUT)
    out: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if target.sentinel_password:
        out["password"] = target.sentinel_password
    return out


def celery_settings(url: str) -> dict[str, Any]:
    """Celery's broker and result backend settings for `url` (only the keys this URL needs
    beyond the URL itself; the transport options are to be merged into the configured ones)."""
    target = parse(url)
    if target.is_sentinel:
        userinfo = ""
        if target.username or target.password:
            userinfo = f"{quote(target.username or '', safe='')}:{quote(target.password or '', safe='')}@"
        kombu_url = ";".join(f"sentinel://{userinfo}{host}:{port}/{target.db}" for host, port in target.sentinels)
        options = {"master_name": target.master, "sentinel_kwargs": _sentinel_kwargs(target, {})}
        return {
            "broker_url": kombu_url,
            "result_backend": kombu_url,
            "broker_transport_options": options,
            "result_backend_transport_options": options,
        }
    out: dict[str, Any] = {"broker_url": url, "result_backend": url}
    if target.tls:
        # Kombu falls back to no certificate check without these, and Celery's result
        # backend refuses a rediss:// URL without ssl_cert_reqs
        out["broker_use_ssl"] = dict(target.tls)
        out["redis_backend_use_ssl"] = dict(target.tls)
    return out


def configure_celery(conf: MutableMapping[str, Any], url: str) -> None:
    """Point a Celery app's configuration at `url` (broker and result backend), keeping
    the transport options already configured; an empty `url` unsets both."""
    wanted = celery_settings(url) if url else {"broker_url": None, "result_backend": None}
    # what an earlier URL of another kind set goes first (tests point one process at several)
    for key in ("broker_use_ssl", "redis_backend_use_ssl"):
        conf[key] = wanted.get(key)
    for key in ("broker_transport_options", "result_backend_transport_options"):
        kept = {k: v for k, v in (conf.get(key) or {}).items() if k not in _SENTINEL_OPTIONS}
        conf[key] = {**kept, **(wanted.get(key) or {})}
    conf["broker_url"], conf["result_backend"] = wanted["broker_url"], wanted["result_backend"]


def broker_url(url: str) -> str:
    """The broker URL Celery is given for `url` (equal to `url` unless it names Sentinels)."""
    return str(celery_settings(url)["broker_url"]) if url else ""


def redact(url: str) -> str:
    """`url` with its passwords replaced by ``***``, for logs and printed lines."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, qmark, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    if query:
        query = "&".join(
            f"{p.partition('=')[0]}=***" if "password" in p.partition("=")[0].lower() else p for p in query.split("&")
        )
    return f"{scheme}{sep}{netloc}{slash}{path}{qmark}{query}"
