"""Real Cassandra, Kafka, FerretDB, HiveMQ and Alertmanager servers for the tests and the bench.

Nothing of them is in the repository: each is fetched by package name from its registry
(Maven Central through `mvn`, the Go module proxy through `go`) into the user's cache
(`~/.cache/iotflow`, `$IOTFLOW_CACHE_DIR`), or is Debian's package (Alertmanager, which
scripts/_venv.sh installs), then run as a child process on free loopback ports with its
data in a directory of the caller's. Where a toolchain or package is missing,
`ServerUnavailable` says which to install.
"""

from worker.tools.servers.alertmanager import AlertmanagerServer
from worker.tools.servers.cassandra import CassandraServer
from worker.tools.servers.ferretdb import FerretDBServer
from worker.tools.servers.hivemq import HiveMQServer
from worker.tools.servers.kafka import KafkaServer
from worker.tools.servers.process import ServerProcess
from worker.tools.servers.toolchains import ServerUnavailable

__all__ = [
    "AlertmanagerServer",
    "CassandraServer",
    "FerretDBServer",
    "HiveMQServer",
    "KafkaServer",
    "ServerProcess",
    "ServerUnavailable",
]
