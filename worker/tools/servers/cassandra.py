"""Cassandra 5.0, one node, from `org.apache.cassandra:cassandra-all` on Maven Central."""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from pathlib import Path

from worker.tools.embedded import free_port
from worker.tools.servers.keystore import TlsIdentity
from worker.tools.servers.process import ServerProcess
from worker.tools.servers.toolchains import find_java, maven_classpath

__all__ = ["CASSANDRA_VERSION", "CassandraServer"]

CASSANDRA_VERSION = "5.0.9"  # the newest 5.0.x that resolves on Maven Central (2026-12)

# The JDK 17 options of Cassandra's own conf/jvm17-server.options (5.0), as its
# bin/cassandra passes them; the heap is bounded for a test machine instead of sized by RAM.
JVM17_SERVER_OPTIONS = [
    "-XX:+UseG1GC",
    "-XX:+ParallelRefProcEnabled",
    "-XX:MaxTenuringThreshold=1",
    "-XX:G1HeapRegionSize=16m",
    "-XX:G1RSetUpdatingPauseTimePercent=5",
    "-XX:MaxGCPauseMillis=300",
    "-XX:InitiatingHeapOccupancyPercent=70",
    "-Djdk.attach.allowAttachSelf=true",
    *(
        f"--add-exports={name}=ALL-UNNAMED"
        for name in (
            "java.base/jdk.internal.misc",
            "java.management.rmi/com.sun.jmx.remote.internal.rmi",
            "java.rmi/sun.rmi.registry",
            "java.rmi/sun.rmi.server",
            "java.sql/java.sql",
            "java.base/java.lang.ref",
            "jdk.unsupported/sun.misc",
            "jdk.compiler/com.sun.tools.javac.file",
            "jdk.attach/sun.tools.attach",
        )
    ),
    *(
        f"--add-opens={name}=ALL-UNNAMED"
        for name in (
            "java.base/java.lang.module",
            "java.base/jdk.internal.loader",
            "java.base/jdk.internal.ref",
            "java.base/jdk.internal.reflect",
            "java.base/jdk.internal.math",
            "java.base/jdk.internal.module",
            "java.base/jdk.internal.util.jar",
            "jdk.management/com.sun.management.internal",
            "java.base/sun.nio.ch",
            "java.base/java.io",
            "java.base/java.lang.reflect",
            "jdk.compiler/com.sun.tools.javac",
            "java.base/java.lang",
            "java.base/java.util",
        )
    ),
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dio.netty.allocator.useCacheForAllThreads=true",
    "-Dio.netty.allocator.maxOrder=11",
]

# Only keys 5.0 knows (it refuses unknown ones); one token, no waiting for a ring to settle.
CASSANDRA_YAML = """\
cluster_name: iotflow
num_tokens: 1
initial_token: 0
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:{storage_port}"
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: {storage_port}
native_transport_port: {port}
start_native_transport: true
{commitlog}
data_file_directories: [{data}/data]
commitlog_directory: {data}/commitlog
saved_caches_directory: {data}/saved_caches
hints_directory: {data}/hints
cdc_raw_directory: {data}/cdc_raw
auto_snapshot: false
"""

# With `secured`: logins (the superuser cassandra/cassandra is made at start) and client
# encryption, optional, so that the plain readiness probe still has its answer on the same port.
SECURED_YAML = """\
authenticator: PasswordAuthenticator
client_encryption_options:
  enabled: true
  optional: true
  keystore: {keystore}
  keystore_password: {password}
  store_type: PKCS12
"""

# CQL native protocol v4: OPTIONS (opcode 5) on stream 0, answered by SUPPORTED (opcode 6).
_OPTIONS = struct.pack("!BBhBi", 0x04, 0, 0, 0x05, 0)


# Cassandra's default: a write is acknowledged before its commit log is synced, which happens
# every 10 s. A node killed (-9) loses what it acknowledged since (seen: 4 of 10 rows written just
# before a kill were gone after the restart); `batch` syncs before every acknowledgement.
COMMITLOG_PERIODIC = "commitlog_sync: periodic\ncommitlog_sync_period: 10000ms"
COMMITLOG_BATCH = "commitlog_sync: batch"


class CassandraServer(ServerProcess):
    """A one-node cluster (datacenter `datacenter1`) on free loopback ports, heap 1 GB.

    `durable_acks`: the commit log is synced before a write is acknowledged (`batch`), so a
    kill -9 loses nothing acknowledged; else Cassandra's default (`periodic`, 10 s).
    `tls`: logins (PasswordAuthenticator, superuser cassandra/cassandra) and client encryption
    with this identity, beside plain connections on the same port."""

    name = "cassandra"
    heap = "1G"

    def __init__(
        self, directory: Path, *, durable_acks: bool = False, tls: TlsIdentity | None = None
    ) -> None:
        super().__init__(directory)
        self.tls = tls
        self.commitlog = COMMITLOG_BATCH if durable_acks else COMMITLOG_PERIODIC
        self.port = free_port()
        self.storage_port = free_port()
        self._java = find_java()
        self._classpath = maven_classpath(
            "cassandra", [f"org.apache.cassandra:cassandra-all:{CASSANDRA_VERSION}"]
        )

    @property
    def hosts(self) -> str:
        """IOTFLOW_CASSANDRA_HOSTS for it."""
        return f"127.0.0.1:{self.port}"

    def prepare(self) -> None:
        (self.directory / "cassandra.yaml").write_text(
            CASSANDRA_YAML.format(
                port=self.port, storage_port=self.storage_port, data=self.directory, commitlog=self.commitlog
            )
            + (
                SECURED_YAML.format(keystore=self.tls.keystore, password=self.tls.password)
                if self.tls
                else ""
            )
        )

    def command(self) -> Sequence[str]:
        return [
            self._java,
            f"-Xms{self.heap}",
            f"-Xmx{self.heap}",
            "-Xss512k",
            *JVM17_SERVER_OPTIONS,
            f"-Dcassandra.config=file://{self.directory}/cassandra.yaml",
            f"-Dcassandra.storagedir={self.directory}",
            "-Dcassandra-foreground=yes",
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-Dcassandra.superuser_setup_delay_ms=0",
            "-cp",
            self._classpath,
            "org.apache.cassandra.service.CassandraDaemon",
        ]

    def problem(self) -> str | None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.sendall(_OPTIONS)
                header = sock.recv(9)
        except OSError as exc:
            return str(exc)
        if len(header) == 9 and header[0] == 0x84 and header[4] == 0x06:
            return None
        return f"OPTIONS answered {header.hex()}"
