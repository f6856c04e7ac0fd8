# Sourced by the scripts: make .venv (Python >= 3.11) and install the project with the given extras,
# at the versions in constraints.txt (the set the suite passed with; its header says how to renew it).
set -euo pipefail
extras="$1"
python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "IoTFlow worker needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
# The embedded broker is Mosquitto (no pip-installable broker speaks MQTT 5); install it when we can.
if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing mosquitto (the embedded MQTT broker) with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  else
    echo "note: no mosquitto on PATH; install it (apt-get install mosquitto / brew install mosquitto)" >&2
  fi
fi
# Alert notifications are tested against a real Prometheus Alertmanager (Debian's package).
if [ "$extras" = test ] && ! command -v prometheus-alertmanager >/dev/null && [ ! -x /usr/bin/prometheus-alertmanager ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing prometheus-alertmanager (for the notification tests) with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus-alertmanager >/dev/null
  else
    echo "note: no prometheus-alertmanager; the Alertmanager tests will skip (apt-get install prometheus-alertmanager)" >&2
  fi
fi
# The secured-store tests run Debian's PostgreSQL and redis-server (the embedded ones are built
# without TLS); policy-rc.d or no init system keeps apt from starting them as services.
if [ "$extras" = test ] && { ! command -v redis-server >/dev/null || ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing postgresql and redis-server (for the TLS tests) with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server >/dev/null
  else
    echo "note: no postgresql/redis-server; the secured-store tests will skip (apt-get install postgresql redis-server)" >&2
  fi
fi
# The tests validate docker-compose.yml offline with `docker-compose config` (no engine needed).
if [ "$extras" = test ] && ! command -v docker-compose >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing docker-compose (to validate docker-compose.yml) with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
  else
    echo "note: no docker-compose on PATH; tests/test_compose.py will skip (apt-get install docker-compose)" >&2
  fi
fi
# The suite's Cassandra, Kafka and HiveMQ come through Maven and run on Java 17 (HiveMQ's test
# extension is compiled with javac); FerretDB is built with Go (worker/tools/servers). Debian
# carries the first two; its Go is too old for FerretDB.
if [ "$extras" = test ]; then
  if ! command -v mvn >/dev/null || ! command -v java >/dev/null || ! command -v javac >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "installing Java 17 and Maven (for the suite's Cassandra, Kafka and HiveMQ) with apt-get" >&2
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jdk-headless maven >/dev/null
    else
      echo "note: no java/javac/mvn; the Cassandra, Kafka and HiveMQ tests will skip (install OpenJDK 17 and Maven)" >&2
    fi
  fi
  if ! command -v go >/dev/null; then
    echo "note: no go; the FerretDB (MongoDB-protocol) tests will skip (install Go 1.22+ from https://go.dev/dl)" >&2
  fi
fi
