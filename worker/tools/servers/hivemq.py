"""HiveMQ Community Edition, a second MQTT 5 broker, from `com.hivemq:hivemq-community-edition-embedded`
on Maven Central, run by the main class its jar ships (`com.hivemq.HiveMQServer`).

The embedded artifact comes without the "allow all" security extension of HiveMQ's
distribution, and without any security extension HiveMQ refuses every client. So a tiny
extension of ours (`EXTENSION_SOURCE`) is compiled once with `javac` into the cache: it
admits every client and refuses subscriptions under `denied/`, so tests can see a SUBACK
refusal from HiveMQ as well as from Mosquitto's ACLs.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import zipfile
from collections.abc import Sequence
from pathlib import Path

import mqtt5

from worker.tools.embedded import free_port
from worker.tools.servers.process import ServerProcess
from worker.tools.servers.toolchains import ServerUnavailable, _locked, cache_dir, find_java, maven_classpath

__all__ = ["HIVEMQ_VERSION", "HiveMQServer"]

HIVEMQ_VERSION = "2025.5"
KEYSTORE_PASSWORD = "iotflow"  # of the test keystore made from the caller's PEM files

EXTENSION_ID = "iotflow-test-security"
EXTENSION_SOURCE = """\
package iotflow;

import com.hivemq.extension.sdk.api.ExtensionMain;
import com.hivemq.extension.sdk.api.auth.SimpleAuthenticator;
import com.hivemq.extension.sdk.api.auth.SubscriptionAuthorizer;
import com.hivemq.extension.sdk.api.parameter.ExtensionStartInput;
import com.hivemq.extension.sdk.api.parameter.ExtensionStartOutput;
import com.hivemq.extension.sdk.api.parameter.ExtensionStopInput;
import com.hivemq.extension.sdk.api.parameter.ExtensionStopOutput;
import com.hivemq.extension.sdk.api.services.Services;

/** Admits every client; refuses any subscription under denied/ (a SUBACK refusal to test). */
public final class TestSecurity implements ExtensionMain {
    @Override
    public void extensionStart(ExtensionStartInput input, ExtensionStartOutput output) {
        SimpleAuthenticator admit = (connect, result) -> result.authenticateSuccessfully();
        SubscriptionAuthorizer authorize = (subscribe, result) -> {
            if (subscribe.getSubscription().getTopicFilter().replaceFirst("^\\\\$share/[^/]+/", "")
                    .startsWith("denied/")) {
                result.failAuthorization();
            } else {
                result.authorizeSuccessfully();
            }
        };
        Services.securityRegistry().setAuthenticatorProvider(provider -> admit);
        Services.securityRegistry().setAuthorizerProvider(provider -> authorize);
    }

    @Override
    public void extensionStop(ExtensionStopInput input, ExtensionStopOutput output) {}
}
"""

EXTENSION_XML = f"""\
<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<hivemq-extension>
    <id>{EXTENSION_ID}</id>
    <name>IoTFlow test security</name>
    <version>1</version>
    <priority>0</priority>
</hivemq-extension>
"""

CONFIG_XML = """\
<?xml version="1.0"?>
<hivemq>
    <listeners>
        <tcp-listener><port>{port}</port><bind-address>127.0.0.1</bind-address></tcp-listener>
{tls_listener}
    </listeners>
    <mqtt>
        <!-- HiveMQ's default is 10 unacknowledged QoS 1 messages from each client, and paho
             (the simulator's client) does not keep to a server's Receive Maximum: over it,
             HiveMQ disconnects the publisher. -->
        <receive-maximum><server-receive-maximum>65535</server-receive-maximum></receive-maximum>
    </mqtt>
    <anonymous-usage-statistics><enabled>false</enabled></anonymous-usage-statistics>
</hivemq>
"""

TLS_LISTENER = """\
        <tls-tcp-listener>
            <port>{port}</port>
            <bind-address>127.0.0.1</bind-address>
            <tls>
                <keystore>
                    <path>{keystore}</path>
                    <password>{password}</password>
                    <private-key-password>{password}</private-key-password>
                </keystore>
            </tls>
        </tls-tcp-listener>"""


def security_extension_jar(java: str, classpath: str) -> Path:
    """The test-security extension's jar, compiled once into the cache (needs a JDK's javac)."""
    digest = hashlib.sha256((EXTENSION_SOURCE + HIVEMQ_VERSION).encode()).hexdigest()[:12]
    directory = cache_dir() / "hivemq" / f"extension-{digest}"
    jar = directory / f"{EXTENSION_ID}.jar"
    with _locked(directory):
        if jar.exists():
            return jar
        javac = Path(java).with_name("javac")
        if not javac.exists():
            raise ServerUnavailable(
                "needs a JDK's javac to build HiveMQ's test extension: "
                "install OpenJDK 17 (apt-get install openjdk-17-jdk-headless)"
            )
        source = directory / "src" / "iotflow" / "TestSecurity.java"
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(EXTENSION_SOURCE)
        classes = directory / "classes"
        result = subprocess.run(
            [str(javac), "--release", "11", "-cp", classpath, "-d", str(classes), str(source)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise ServerUnavailable(f"javac could not build HiveMQ's test extension: {result.stderr[-1500:]}")
        with zipfile.ZipFile(f"{jar}.new", "w") as archive:
            for path in classes.rglob("*.class"):
                archive.write(path, path.relative_to(classes).as_posix())
            archive.writestr(
                "META-INF/services/com.hivemq.extension.sdk.api.ExtensionMain", "iotflow.TestSecurity\n"
            )
        shutil.rmtree(classes)
        Path(f"{jar}.new").replace(jar)
        return jar


def _connect_probe() -> bytes:
    return mqtt5.ConnectPacket("iotflow-probe", clean_start=True, keep_alive=0).write()


class HiveMQServer(ServerProcess):
    """HiveMQ CE on a free loopback port, heap 256 MB; its file persistence (sessions and
    their queued messages) survives `kill` and `start`.

    With `tls` (a certificate and its key, PEM files) it also listens with TLS on `tls_port`."""

    name = "hivemq"
    heap = "256m"

    def __init__(self, directory: Path, tls: tuple[Path, Path] | None = None) -> None:
        super().__init__(directory)
        self.port = free_port()
        self.tls = tls
        self.tls_port = free_port() if tls is not None else None
        self._java = find_java()
        self._classpath = maven_classpath(
            "hivemq", [f"com.hivemq:hivemq-community-edition-embedded:{HIVEMQ_VERSION}"]
        )
        self._extension = security_extension_jar(self._java, self._classpath)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def prepare(self) -> None:
        for folder in ("conf", "data", "log", "extensions"):
            (self.directory / folder).mkdir(exist_ok=True)
        extension = self.directory / "extensions" / EXTENSION_ID
        extension.mkdir(exist_ok=True)
        (extension / "hivemq-extension.xml").write_text(EXTENSION_XML)
        shutil.copy(self._extension, extension / self._extension.name)
        tls_listener = ""
        if self.tls is not None:
            keystore = self.directory / "conf" / "keystore.p12"
            keystore.write_bytes(_pkcs12(*self.tls))
            tls_listener = TLS_LISTENER.format(
                port=self.tls_port, keystore=keystore, password=KEYSTORE_PASSWORD
            )
        (self.directory / "conf" / "config.xml").write_text(
            CONFIG_XML.format(port=self.port, tls_listener=tls_listener)
        )

    def command(self) -> Sequence[str]:
        return [
            self._java,
            f"-Xms{self.heap}",
            f"-Xmx{self.heap}",
            f"-Dhivemq.home={self.directory}",
            "-cp",
            self._classpath,
            "com.hivemq.HiveMQServer",
        ]

    def problem(self) -> str | None:
        """Served once an MQTT 5 CONNECT is answered by a CONNACK "success" (the extension is
        loaded: before it, HiveMQ refuses every client) and the TLS listener, if any, listens."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.sendall(_connect_probe())
                answer = sock.recv(64)
        except OSError as exc:
            return str(exc)
        try:
            packet, _ = mqtt5.read(memoryview(answer))
        except (IndexError, ValueError):
            return f"CONNECT answered {answer.hex() or 'nothing'}"
        if (
            not isinstance(packet, mqtt5.ConnAckPacket)
            or packet.reason_code != mqtt5.ConnAckReasonCode.SUCCESS
        ):
            return f"CONNECT answered {packet!r}"
        if self.tls_port is not None:  # started after the plain listener
            try:
                socket.create_connection(("127.0.0.1", self.tls_port), timeout=2).close()
            except OSError as exc:
                return f"TLS listener: {exc}"
        return None


def _pkcs12(certificate: Path, key: Path) -> bytes:
    """A PKCS#12 keystore of a PEM certificate (with its chain) and key, for HiveMQ's listener."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import (
        BestAvailableEncryption,
        load_pem_private_key,
        pkcs12,
    )

    chain = x509.load_pem_x509_certificates(certificate.read_bytes())
    private_key = load_pem_private_key(key.read_bytes(), None)
    return pkcs12.serialize_key_and_certificates(
        b"broker",
        private_key,  # type: ignore[arg-type]
        chain[0],
        chain[1:] or None,
        BestAvailableEncryption(KEYSTORE_PASSWORD.encode()),
    )
