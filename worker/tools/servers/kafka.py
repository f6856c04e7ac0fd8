"""Apache Kafka 4, one KRaft node (broker and controller), from `org.apache.kafka:kafka_2.13`
on Maven Central, its storage formatted by Kafka's own StorageTool."""

from __future__ import annotations

import base64
import socket
import struct
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from worker.tools.embedded import free_port
from worker.tools.servers.keystore import TlsIdentity
from worker.tools.servers.process import ServerProcess
from worker.tools.servers.toolchains import find_java, maven_classpath

__all__ = ["KAFKA_VERSION", "KafkaServer"]

KAFKA_VERSION = "4.4.0"
# Kafka logs through SLF4J 1.x; this binding sends it to log4j2 (warnings and up, to the log file).
_LOGGING = "org.apache.logging.log4j:log4j-slf4j-impl:2.25.5"

SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}{proxied_listener}{secured_listeners}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}{proxied_advertised}{secured_listeners}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,PROXIED:PLAINTEXT,SASL_SSL:SASL_SSL,MTLS:SSL
log.dirs={directory}/log
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# After a kill -9 the controller refuses the broker's new registration until the dead
# one's session expires (9 s by default): a restart serves again in ~5 s instead of ~13.
broker.session.timeout.ms=2000
broker.heartbeat.interval.ms=500
"""


# The secured listeners: SASL_SSL (PLAIN and SCRAM logins over TLS) and MTLS (TLS, a client
# certificate from the CA required). The SCRAM credentials are added by the storage format.
SECURED_PROPERTIES = """\
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule \\
  required {plain_users};
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=\\
  org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=\\
  org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PKCS12
ssl.keystore.location={keystore}
ssl.keystore.password={password}
ssl.truststore.type=PEM
ssl.truststore.location={ca_file}
listener.name.mtls.ssl.client.auth=required
"""


def _cluster_id() -> str:
    """A random cluster id as Kafka's own Uuid.randomUuid makes them: 16 bytes, URL-safe
    base64, never starting with "-" (the storage tool would read it as an option)."""
    while (candidate := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"):
        pass
    return candidate


def _metadata_request() -> bytes:
    """Metadata v1 for no topic (an empty array: v1 reads null as "all"); client id "probe"."""
    body = struct.pack("!hhih", 3, 1, 1, 5) + b"probe" + struct.pack("!i", 0)
    return struct.pack("!i", len(body)) + body


class KafkaServer(ServerProcess):
    """One KRaft node on free loopback ports, heap 512 MB; its log survives `kill` and `start`.

    `properties` are added to its server.properties (a later key wins). With
    `advertised_port` it has a second listener, on `proxied_port`, that names
    `advertised_port` in its metadata answers: a proxy listening there and forwarding to
    `proxied_port` is then the only way its clients reach it (`proxied_bootstrap`), since a
    client connects to the address the metadata names, not the one it bootstrapped from.
    `bootstrap` stays direct, for a test to look at the log while the proxy is cut.

    With `tls` and `users` (name → password) it has two secured listeners beside the plain
    one: SASL_SSL (`sasl_ssl_bootstrap`: PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 logins of
    `users`) and MTLS (`mtls_bootstrap`: TLS with a client certificate from `tls.ca_file`)."""

    name = "kafka"
    heap = "512m"

    def __init__(
        self,
        directory: Path,
        advertised_port: int | None = None,
        properties: dict[str, str] | None = None,
        *,
        tls: TlsIdentity | None = None,
        users: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(directory)
        self.tls = tls
        self.users = dict(users or {})
        self.sasl_ssl_port = free_port() if tls is not None else None
        self.mtls_port = free_port() if tls is not None else None
        self.properties = properties or {}  # server.properties of the caller's, over the ones above
        self.port = free_port()
        self.controller_port = free_port()
        self.advertised_port = advertised_port
        self.proxied_port = free_port() if advertised_port is not None else None
        self._java = find_java()
        self._classpath = maven_classpath("kafka", [f"org.apache.kafka:kafka_2.13:{KAFKA_VERSION}", _LOGGING])

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def proxied_bootstrap(self) -> str:
        """The proxy's address, as the proxied listener advertises it."""
        if self.advertised_port is None:
            raise ValueError("this KafkaServer has no advertised_port")
        return f"127.0.0.1:{self.advertised_port}"

    @property
    def sasl_ssl_bootstrap(self) -> str:
        if self.sasl_ssl_port is None:
            raise ValueError("this KafkaServer has no secured listeners (tls)")
        return f"127.0.0.1:{self.sasl_ssl_port}"

    @property
    def mtls_bootstrap(self) -> str:
        if self.mtls_port is None:
            raise ValueError("this KafkaServer has no secured listeners (tls)")
        return f"127.0.0.1:{self.mtls_port}"

    def _java_command(self, heap: str, *arguments: str) -> list[str]:
        return [
            self._java,
            f"-Xms{heap}",
            f"-Xmx{heap}",
            "-Dlog4j2.level=WARN",
            "-cp",
            self._classpath,
            *arguments,
        ]

    def prepare(self) -> None:
        properties = self.directory / "server.properties"
        proxied = self.advertised_port is not None
        secured = ""
        if self.tls is not None:
            secured = f",SASL_SSL://127.0.0.1:{self.sasl_ssl_port},MTLS://127.0.0.1:{self.mtls_port}"
        properties.write_text(
            SERVER_PROPERTIES.format(
                port=self.port,
                controller_port=self.controller_port,
                directory=self.directory,
                proxied_listener=f",PROXIED://127.0.0.1:{self.proxied_port}" if proxied else "",
                proxied_advertised=f",PROXIED://127.0.0.1:{self.advertised_port}" if proxied else "",
                secured_listeners=secured,
            )
            + self._secured_properties()
            + "".join(f"{key}={value}\n" for key, value in self.properties.items())
        )
        cluster_id = _cluster_id()
        scram = [
            argument
            for name, password in self.users.items()
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512")
            for argument in ("--add-scram", f"{mechanism}=[name={name},password={password}]")
        ]
        format_storage = self._java_command(
            "256m", "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(properties), *scram
        )
        result = subprocess.run(format_storage, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"kafka storage format failed: {result.stdout[-1500:]}{result.stderr[-1500:]}")

    def _secured_properties(self) -> str:
        if self.tls is None:
            return ""
        plain_users = " ".join(f'user_{name}="{password}"' for name, password in self.users.items())
        return SECURED_PROPERTIES.format(
            plain_users=plain_users,
            keystore=self.tls.keystore,
            password=self.tls.password,
            ca_file=self.tls.ca_file,
        )

    def command(self) -> Sequence[str]:
        return self._java_command(self.heap, "kafka.Kafka", str(self.directory / "server.properties"))

    def problem(self) -> str | None:
        """Served once a Metadata answer lists the broker (registered with its controller)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.sendall(_metadata_request())
                answer = sock.recv(16)
        except OSError as exc:
            return str(exc)
        if len(answer) >= 12:
            (brokers,) = struct.unpack("!i", answer[8:12])
            return None if brokers > 0 else "no broker registered yet"
        return f"Metadata answered {answer.hex()}"
