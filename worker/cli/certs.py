"""`iotflow certs …`: the certificate authority for mutual TLS (worker/ops/certs.py).

    iotflow certs init [--days N] [--key TYPE] [--cn NAME]
    iotflow certs broker HOST [--san NAME_OR_IP …] [--name server]
    iotflow certs device MAC [MAC …]          CN = f2-aabbccddee01, the device's topic identity
    iotflow certs client NAME [NAME …]        workers and other clients, CN = NAME
    iotflow certs list [--json]
    iotflow certs revoke NAME                 NAME: a file name (f2-aabbccddee01) or a MAC
    iotflow certs acl [--out FILE] [--reader NAME …]

Every verb takes `--dir DIR` (default /etc/iotflow/certs). An existing certificate is kept
(`--force` issues it again). Exit codes (worker.exit_codes): 0 done, 1 refused (no CA yet,
no such certificate), 2 a bad MAC, name, SAN or number of days.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.config import Settings
from worker.exit_codes import ExitCode

if TYPE_CHECKING:
    from worker.ops.certs import Issued

# The same as worker.ops.certs.KEY_TYPES, spelled out so that parsing a command line does
# not load `cryptography` (handlers import what they need when they run).
KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")
DEFAULT_DIR = Path("/etc/iotflow/certs")


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Register `certs` and its verbs."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help=f"where the CA and certificates live ({DEFAULT_DIR})"
    )
    leaf = argparse.ArgumentParser(add_help=False, parents=[common])
    leaf.add_argument("--days", type=int, default=825, help="validity (default 825, at most the CA's)")
    leaf.add_argument("--key", choices=KEY_TYPES, default="ec-p256", help="key type (default ec-p256)")
    leaf.add_argument("--force", action="store_true", help="issue again even if it exists")

    certs = commands.add_parser("certs", help="a CA, broker, device and client certificates, CRL, ACL")
    verbs = certs.add_subparsers(dest="verb", required=True, metavar="VERB")

    init = verbs.add_parser(
        "init", parents=[common], help="create the CA (kept if it exists) and an empty CRL"
    )
    init.add_argument("--days", type=int, default=3650, help="validity (default 3650)")
    init.add_argument("--key", choices=KEY_TYPES, default="ec-p256", help="key type (default ec-p256)")
    init.add_argument("--cn", default="IoTFlow MQTT CA", help="the CA's common name")
    init.set_defaults(handler=_init)

    broker = verbs.add_parser("broker", parents=[leaf], help="the broker's certificate (server.crt/.key)")
    broker.add_argument("host", metavar="HOST", help="the name clients connect to (CN and SAN)")
    broker.add_argument(
        "--san", action="append", default=[], metavar="NAME_OR_IP", help="another DNS name or IP (repeat)"
    )
    broker.add_argument("--name", default="server", help="file name (default server)")
    broker.set_defaults(handler=_broker)

    device = verbs.add_parser("device", parents=[leaf], help="device certificates, CN = f2-<mac>")
    device.add_argument("macs", nargs="+", metavar="MAC", help="aa:bb:cc:dd:ee:01, AABBCCDDEE01, …")
    device.set_defaults(handler=_device)

    client = verbs.add_parser("client", parents=[leaf], help="client certificates (workers), CN = NAME")
    client.add_argument("names", nargs="+", metavar="NAME")
    client.set_defaults(handler=_client)

    listing = verbs.add_parser("list", parents=[common], help="the certificates and whether they are valid")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_list)

    revoke = verbs.add_parser("revoke", parents=[common], help="add a certificate to the CRL (crl.pem)")
    revoke.add_argument("name", metavar="NAME", help="a certificate's file name, or a device's MAC")
    revoke.set_defaults(handler=_revoke)

    acl = verbs.add_parser("acl", parents=[common], help="write a Mosquitto acl_file")
    acl.add_argument("--out", type=Path, default=None, help="where (default DIR/acl)")
    acl.add_argument(
        "--reader",
        action="append",
        default=None,
        metavar="NAME",
        help="a client that may read everything (repeat; default: every valid client certificate)",
    )
    acl.set_defaults(handler=_acl)


def _init(settings: Settings, args: argparse.Namespace) -> int:
    from worker.ops.certs import CertStore

    return _guarded(lambda: _report(CertStore(args.dir).init(args.days, args.key, args.cn)))


def _broker(settings: Settings, args: argparse.Namespace) -> int:
    from worker.ops.certs import CertStore

    store = CertStore(args.dir)
    return _guarded(
        lambda: _report(store.broker(args.host, args.san, args.days, args.key, args.name, args.force))
    )


def _device(settings: Settings, args: argparse.Namespace) -> int:
    from worker.ops.certs import CertStore

    store = CertStore(args.dir)

    def issue() -> None:
        for mac in args.macs:
            _report(store.device(mac, args.days, args.key, args.force))

    return _guarded(issue)


def _client(settings: Settings, args: argparse.Namespace) -> int:
    from worker.ops.certs import CertStore

    store = CertStore(args.dir)

    def issue() -> None:
        for name in args.names:
            _report(store.client(name, args.days, args.key, args.force))

    return _guarded(issue)


def _list(settings: Settings, args: argparse.Namespace) -> int:
    import orjson

    from worker.ops.certs import CertStore

    def show() -> None:
        entries = CertStore(args.dir).entries()
        if args.json:
            rows = [
                {
                    "name": e.name,
                    "kind": e.kind,
                    "subject": e.subject,
                    "serial": f"{e.serial:x}",
                    "not_after": e.not_after.isoformat(),
                    "status": e.status,
                }
                for e in entries
            ]
            print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
            return
        print(f"{'NAME':<24} {'KIND':<7} {'STATUS':<8} {'EXPIRES':<20} SUBJECT")
        for e in entries:
            expires = e.not_after.strftime("%Y-%m-%d %H:%M:%S")
            print(f"{e.name:<24} {e.kind:<7} {e.status:<8} {expires:<20} {e.subject}")

    return _guarded(show)


def _revoke(settings: Settings, args: argparse.Namespace) -> int:
    from worker.ops.certs import CertStore

    def revoke() -> None:
        crl = CertStore(args.dir).revoke(args.name)
        print(f"revoked {args.name}: {crl} (restart Mosquitto so that it reads the new crlfile)")

    return _guarded(revoke)


def _acl(settings: Settings, args: argparse.Namespace) -> int:
    from worker.ops.certs import CertStore

    def write() -> None:
        path, readers = CertStore(args.dir).write_acl(args.out, args.reader)
        print(f"wrote {path}: readers {', '.join(readers) or '(none)'}; devices publish under +/<CN>/#")

    return _guarded(write)


def _report(issued: Issued) -> None:
    verb = "created" if issued.created else "kept   "
    print(f"{verb} {issued.cert}  {issued.key}")


def _guarded(action: Callable[[], object]) -> int:
    from worker.ops.certs import CertError, CertUsageError

    try:
        action()
    except CertUsageError as exc:
        print(f"iotflow certs: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except CertError as exc:
        print(f"iotflow certs: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    except OSError as exc:
        print(f"iotflow certs: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    return ExitCode.OK
