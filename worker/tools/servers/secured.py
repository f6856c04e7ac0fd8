"""PostgreSQL, Redis and FerretDB that want TLS and a password, with a server certificate from
the project's CA (`iotflow certs`, worker/ops/certs.py). PostgreSQL and Redis are Debian's
builds: the embedded ones have no TLS.

Each serves loopback TLS clients that log in with a password, so a client without the CA,
or with a wrong password, is refused: what the secured-store tests need.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from worker.ops.certs import CertStore
from worker.tools.embedded import (
    MOSQUITTO_CONF_TEMPLATE,
    _chown_tree,
    _ensure_traversable,
    _find_mosquitto,
    _pg_run_as,
    free_port,
)
from worker.tools.servers.ferretdb import FerretDBServer
from worker.tools.servers.process import ServerProcess
from worker.tools.servers.toolchains import ServerUnavailable

__all__ = [
    "SecuredFerretDBServer",
    "SecuredMosquittoServer",
    "SecuredPostgresServer",
    "SecuredRedisServer",
    "server_pki",
]

USER = "iotflow"
DATABASE = "iotflow"


def server_pki(directory: Path) -> CertStore:
    """A CA and a certificate for 127.0.0.1 (and localhost) in `directory`, made once."""
    store = CertStore(directory)
    store.init(days=30)
    store.broker("localhost", ["127.0.0.1"], days=30)
    return store


def _accepts_tcp(port: int) -> str | None:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError as exc:
        return f"port {port}: {exc}"
    return None


def _postgres_bindir() -> Path:
    """A PostgreSQL built with OpenSSL: Debian's, found through `pg_config` or /usr/lib/postgresql."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.insert(0, Path(found.stdout.strip()))
    for bindir in candidates:
        if (bindir / "postgres").exists() and (bindir / "initdb").exists():
            return bindir
    raise ServerUnavailable("no PostgreSQL server with TLS (Debian: apt-get install postgresql)")


class SecuredPostgresServer(ServerProcess):
    """`ssl = on`, and only `hostssl` connections with SCRAM passwords in pg_hba.conf (`host`
    ones too with `plain`)."""

    name = "postgres-tls"

    def __init__(self, directory: Path, pki: CertStore, password: str, *, plain: bool = False) -> None:
        """`plain`: also take the password without TLS (the bench compares the two paths)."""
        super().__init__(directory)
        self.port = free_port()
        self.password = password
        self.plain = plain
        self._pki = pki
        self._bindir = _postgres_bindir()
        self._run_as = _pg_run_as()
        self._data = directory / "data"

    def url(self, password: str | None = None, *, tls: bool = True) -> str:
        """The URL of the database over verified TLS (or none: `tls=False`); no password unless given."""
        secret = f":{password}" if password else ""
        query = f"sslmode=verify-full&sslrootcert={self._pki.cert_path('ca')}" if tls else "sslmode=disable"
        return f"postgresql://{USER}{secret}@127.0.0.1:{self.port}/{DATABASE}?{query}"

    def prepare(self) -> None:
        scratch = self.directory / "init"
        scratch.mkdir()
        (scratch / "password").write_text(self.password + "\n")
        run_as = self._run_as
        if run_as is not None:
            _ensure_traversable(self.directory, run_as)
            _chown_tree(scratch, run_as)
        uid, gid = (run_as.uid, run_as.gid) if run_as is not None else (None, None)
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        initdb = [str(self._bindir / "initdb"), "-D", str(self._data), "-U", USER, "--no-sync", "--no-locale"]
        initdb += ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={scratch / 'password'}"]
        if self._run_as is not None:
            self._data.mkdir(mode=0o700)
            os.chown(self._data, self._run_as.uid, self._run_as.gid)
        with self.log_path.open("ab") as log:
            run = functools.partial(
                subprocess.run,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
                env=env,
                cwd="/",
                user=uid,
                group=gid,
            )
            run(initdb)
            run(
                [str(self._bindir / "postgres"), "--single", "-D", str(self._data), "postgres"],
                input=f"CREATE DATABASE {DATABASE};\n".encode(),
            )
        # The server reads its key only when the key belongs to it and no one else may read it.
        shutil.copy(self._pki.cert_path("server"), self._data / "server.crt")
        shutil.copy(self._pki.key_path("server"), self._data / "server.key")
        (self._data / "server.key").chmod(0o600)
        without_tls = "scram-sha-256" if self.plain else "reject"
        (self._data / "pg_hba.conf").write_text(
            f"hostssl all all 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 {without_tls}\n"
        )
        if self._run_as is not None:
            _chown_tree(self._data, self._run_as)
        shutil.rmtree(scratch)

    def command(self) -> Sequence[str]:
        argv = [str(self._bindir / "postgres"), "-D", str(self._data), "-c", "listen_addresses=127.0.0.1"]
        argv += ["-c", f"port={self.port}", "-c", "unix_socket_directories=", "-c", "fsync=off"]
        argv += ["-c", "ssl=on", "-c", "ssl_cert_file=server.crt", "-c", "ssl_key_file=server.key"]
        if self._run_as is None:
            return argv
        # As root: PostgreSQL refuses to run as root, so as the embedded server's user.
        return [
            "setpriv",
            f"--reuid={self._run_as.uid}",
            f"--regid={self._run_as.gid}",
            "--clear-groups",
            *argv,
        ]

    def problem(self) -> str | None:
        return _accepts_tcp(self.port)


class SecuredRedisServer(ServerProcess):
    """Debian's redis-server on a TLS port only, with one ACL user and the default user off."""

    name = "redis-tls"

    def __init__(self, directory: Path, pki: CertStore, password: str, *, plain: bool = False) -> None:
        """`plain`: a port without TLS too (the bench compares the two paths)."""
        super().__init__(directory)
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise ServerUnavailable("no redis-server with TLS (Debian: apt-get install redis-server)")
        self._binary = binary
        self.port = free_port()
        self.plain_port = free_port() if plain else 0
        self.password = password
        self._pki = pki

    def url(self, password: str | None = None, *, tls: bool = True) -> str:
        secret = f":{password}" if password else ""
        if not tls:
            return f"redis://{USER}{secret}@127.0.0.1:{self.plain_port}/0"
        return f"rediss://{USER}{secret}@127.0.0.1:{self.port}/0?ssl_ca_certs={self._pki.cert_path('ca')}"

    def prepare(self) -> None:
        lines = [
            "bind 127.0.0.1",
            f"port {self.plain_port}",
            f"tls-port {self.port}",
            f"tls-cert-file {self._pki.cert_path('server')}",
            f"tls-key-file {self._pki.key_path('server')}",
            f"tls-ca-cert-file {self._pki.cert_path('ca')}",
            "tls-auth-clients no",
            f"dir {self.directory}",
            'save ""',
            "appendonly no",
            f"user {USER} on >{self.password} ~* &* +@all",
            "user default off",
        ]
        (self.directory / "redis.conf").write_text("\n".join(lines) + "\n")

    def command(self) -> Sequence[str]:
        return [self._binary, str(self.directory / "redis.conf")]

    def problem(self) -> str | None:
        return _accepts_tcp(self.port)


class SecuredFerretDBServer(FerretDBServer):
    """FerretDB with a TLS listener beside its plain one (which only the readiness probe uses)
    and one SCRAM user, made at start (FerretDB 1.24's new authentication)."""

    name = "ferretdb-tls"

    def __init__(self, directory: Path, pki: CertStore, password: str) -> None:
        super().__init__(directory)
        self.tls_port = free_port()
        self.password = password
        self._pki = pki

    def tls_url(self, password: str | None = None) -> str:
        secret = f":{password}" if password else ""
        return (
            f"mongodb://{USER}{secret}@127.0.0.1:{self.tls_port}/{DATABASE}"
            f"?tls=true&tlsCAFile={self._pki.cert_path('ca')}"
        )

    def command(self) -> Sequence[str]:
        return [
            *super().command(),
            f"--listen-tls=127.0.0.1:{self.tls_port}",
            f"--listen-tls-cert-file={self._pki.cert_path('server')}",
            f"--listen-tls-key-file={self._pki.key_path('server')}",
            "--test-enable-new-auth",
            f"--setup-database={DATABASE}",
            f"--setup-username={USER}",
            f"--setup-password={self.password}",
        ]


class SecuredMosquittoServer(ServerProcess):
    """Mosquitto with the embedded broker's at-least-once settings on a plain listener and a
    TLS one (server certificate only, anonymous clients), for the bench's plain/TLS runs."""

    name = "mosquitto-tls"

    def __init__(self, directory: Path, pki: CertStore) -> None:
        super().__init__(directory)
        binary = _find_mosquitto()
        if binary is None:
            raise ServerUnavailable("no mosquitto (Debian: apt-get install mosquitto)")
        self._binary = binary
        self.port = free_port()
        self.tls_port = free_port()
        self._pki = pki

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"

    def prepare(self) -> None:
        lines = [MOSQUITTO_CONF_TEMPLATE.format(host="127.0.0.1", port=self.port).rstrip()]
        if os.geteuid() == 0:
            lines.insert(0, "user root")  # the key is 0600, root's
        lines += [
            f"listener {self.tls_port} 127.0.0.1",
            f"cafile {self._pki.cert_path('ca')}",
            f"certfile {self._pki.cert_path('server')}",
            f"keyfile {self._pki.key_path('server')}",
        ]
        (self.directory / "mosquitto.conf").write_text("\n".join(lines) + "\n")

    def command(self) -> Sequence[str]:
        return [self._binary, "-c", str(self.directory / "mosquitto.conf")]

    def problem(self) -> str | None:
        return _accepts_tcp(self.tls_port) or _accepts_tcp(self.port)
