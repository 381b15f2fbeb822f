"""DM_REDIS_URL's forms reach every client: Celery's broker and result backend, the fleet
state, the lease and presence connections (unit tests), and a real Redis over TLS."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from redis.sentinel import SentinelConnectionPool

from dm import embedded, fleet, redis_conn
from dm.errors import ConfigError
from tests.servers import StackInfo
from tests.system import System, forget_connections
from workers.metrics import Presence, lease_client

SENTINEL_URL = "sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26380,10.0.0.3/prod/2"


def celery_app(url: str) -> Celery:
    app = Celery("probe")
    app.config_from_object("celeryconfig")
    redis_conn.configure_celery(app.conf, url)
    return app


@pytest.mark.unit
def test_a_sentinel_url_names_the_sentinels_the_master_and_the_db() -> None:
    target = redis_conn.parse(SENTINEL_URL)
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379))
    assert (target.master, target.db, target.password) == ("prod", 2, "s3cret")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sentinel://h1:26379;sentinel://h2:26379", "not Kombu's ';' list"),
        ("sentinel://h1:26379,h2:26379", "names its master"),
        ("sentinel://h1:port/dm", "is not host:port"),
        ("redis://h:6379/0?ssl_cert_reqs=required", "write rediss://"),
        ("rediss://h:6379/0?ssl_cert_reqs=maybe", "required, optional or none"),
        ("mongodb://h:27017", "must be one of"),
    ],
)
def test_a_bad_url_is_refused_with_what_to_write(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        redis_conn.parse(url)


@pytest.mark.unit
def test_celery_gets_kombus_sentinel_form_and_the_master_name() -> None:
    app = celery_app(SENTINEL_URL)
    kombu_url = (
        "sentinel://:s3cret@10.0.0.1:26379/2;sentinel://:s3cret@10.0.0.2:26380/2;sentinel://:s3cret@10.0.0.3:26379/2"
    )
    assert app.conf.broker_url == app.conf.result_backend == kombu_url
    conn = app.connection_for_write()
    assert conn.transport_options["master_name"] == "prod"
    assert conn.transport_options["visibility_timeout"] == 120  # celeryconfig's options are kept
    assert [a.split("@")[1] for a in conn.alt] == ["10.0.0.1:26379/2", "10.0.0.2:26380/2", "10.0.0.3:26379/2"]
    backend = app.backend
    assert type(backend).__name__ == "SentinelBackend"
    assert backend._transport_options["master_name"] == "prod"
    assert [(h["host"], h["port"]) for h in backend.connparams["hosts"]][1] == ("10.0.0.2", 26380)
    assert (backend.connparams["db"], backend.connparams["password"]) == (2, "s3cret")


@pytest.mark.unit
def test_celery_gets_the_tls_options_of_a_rediss_url(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    url = f"rediss://:pw@redis.example:6380/1?ssl_ca_certs={ca}"
    app = celery_app(url)
    assert app.conf.broker_url == app.conf.result_backend == url  # unchanged: dm's fast paths compare it
    # Kombu reads the ssl_* parameters of the URL itself, over broker_use_ssl; what its
    # connections get checks the server's certificate against the CA
    broker_tls = redis.SSLConnection(**app.connection_for_write().ssl)
    assert (broker_tls.cert_reqs, broker_tls.ca_certs) == (ssl.CERT_REQUIRED, str(ca))
    params = app.backend.connparams
    assert issubclass(params["connection_class"], redis.SSLConnection)
    assert (params["ssl_cert_reqs"], params["ssl_ca_certs"]) == (ssl.CERT_REQUIRED, str(ca))
    # and back to a plain URL: no TLS options, no master name left over
    redis_conn.configure_celery(app.conf, "redis://127.0.0.1:6379/0")
    assert app.conf.broker_use_ssl is None and app.conf.redis_backend_use_ssl is None


@pytest.mark.unit
def test_the_fleet_lease_and_presence_clients_follow_the_sentinels() -> None:
    for client, timeout in [
        (fleet.redis_client(SENTINEL_URL), 5),
        (lease_client(SENTINEL_URL, 3.0), 1.0),
        (Presence(SENTINEL_URL, "7").client, Presence.POLL * 2),
    ]:
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "prod"
        assert (pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == (2, "s3cret")
        assert pool.connection_kwargs["socket_timeout"] == timeout
        sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
        assert [(s["host"], s["port"]) for s in sentinels] == [("10.0.0.1", 26379), ("10.0.0.2", 26380),
                                                               ("10.0.0.3", 26379)]  # fmt: skip
        assert all(s.get("password") is None and s["socket_timeout"] <= redis_conn.SENTINEL_TIMEOUT for s in sentinels)
    presence = Presence(SENTINEL_URL, "7").client.connection_pool.connection_kwargs
    assert presence["client_name"] == fleet.presence_name("7")


@pytest.mark.unit
def test_the_fleet_lease_and_presence_clients_speak_tls_for_rediss(tmp_path: Path) -> None:
    url = f"rediss://127.0.0.1:6380/0?ssl_ca_certs={tmp_path / 'ca.pem'}&ssl_cert_reqs=required"
    for client in (fleet.redis_client(url), lease_client(url, 3.0), Presence(url, "7").client):
        pool = client.connection_pool
        assert issubclass(pool.connection_class, redis.SSLConnection)
        assert pool.connection_kwargs["ssl_ca_certs"] == str(tmp_path / "ca.pem")


@pytest.mark.unit
def test_the_sentinels_own_password_goes_to_them_only() -> None:
    client = redis_conn.client("sentinel://:master-pw@h1:26379/dm?sentinel_password=sentinel-pw")
    pool = client.connection_pool
    assert pool.connection_kwargs["password"] == "master-pw"
    assert pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs["password"] == "sentinel-pw"


@pytest.mark.unit
def test_redact_hides_every_password() -> None:
    assert redis_conn.redact("sentinel://:pw@h1:1,h2:2/dm/0?sentinel_password=x") == (
        "sentinel://:***@h1:1,h2:2/dm/0?sentinel_password=***"
    )
    assert redis_conn.redact("rediss://user:pw@h:6380/0") == "rediss://user:***@h:6380/0"
    assert redis_conn.redact("redis://h:6379/0") == "redis://h:6379/0"


# -- a real Redis over TLS --------------------------------------------------------------


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1 (openssl)."""
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "redis.key", "redis.csr", "redis.pem"))
    ext = directory / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for cmd in (
        f"req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=dm-test-ca -keyout {ca_key} -out {ca}",
        f"req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout {key} -out {csr}",
        f"x509 -req -in {csr} -CA {ca} -CAkey {ca_key} -CAcreateserial -days 2 -out {cert} -extfile {ext}",
    ):
        subprocess.run(["openssl", *cmd.split()], check=True, capture_output=True)
    return ca, cert, key


def _tls_supported(binary: str) -> bool:
    """Whether `binary` takes TLS settings (a build without TLS refuses ``tls-port``)."""
    out = subprocess.run([binary, "--port", "0", "--tls-port", "0"], capture_output=True, text=True, timeout=10)
    return "not listen anywhere" in out.stdout + out.stderr


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A Redis that speaks TLS on one port (its plain port is for the embedded probe only)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificates for a TLS Redis")
    binary = embedded.find_redis_server()
    if not _tls_supported(binary):
        pytest.skip(f"{binary} was built without TLS")
    ca, cert, key = _certificates(tmp_path)
    tls_port = embedded.free_port()
    home = tmp_path / "tls"
    (home / "redis").mkdir(parents=True)
    flags = (f"--port {{port}} --bind 127.0.0.1 --save '' --appendonly no --dir {home / 'redis'} "
             f"--tls-port {tls_port} --tls-cert-file {cert} --tls-key-file {key} --tls-ca-cert-file {ca} "
             "--tls-auth-clients no")  # fmt: skip
    argv = [binary, *(a.strip("'") for a in flags.split())]
    server = embedded._start("redis", home, argv, "redis://127.0.0.1:{port}/0", None)
    try:
        yield f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}", ca
    finally:
        server.stop()


def test_a_system_on_rediss_deploys_and_runs(tls_redis: tuple[str, Path], stack: StackInfo, tmp_path: Path) -> None:
    url, _ = tls_redis
    # Given: a TLS Redis that a client without the CA cannot talk to
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        redis.Redis.from_url(url.split("?")[0], socket_timeout=2).ping()
    # When: the whole system (control worker, beat, a node, this process) uses the rediss:// URL
    system = System(url, stack.mongo_url, tmp_path / "home")
    try:
        system.start(nodes=1)
        system.add_examples("hello")
        dep = system.deploy("hello", args={"who": "tls"})
        # Then: the deploy went through the broker and the result backend, the node ran it
        done = system.wait_state(dep["id"], "succeeded", timeout=60)
        assert done["node"] == system.wait_nodes_up(1)[0]
        assert system.ctl.redis.connection_pool.connection_class is redis.SSLConnection
        logs = system.dm("logs", dep["id"])
        assert "tls" in logs.stdout, logs.stderr
    finally:
        system.stop()
        forget_connections()
