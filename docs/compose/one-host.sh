#!/bin/bash
# N pop3frame instances + HAProxy (PROXY protocol v2) + PostgreSQL on one
# host, without containers: the shell twin of docker-compose.yml here.
#
# Needs, on Debian or Ubuntu, as root:
#     apt-get install postgresql haproxy curl
#     .venv/bin/pip install -e '.[postgres]'     # in the checkout, as the README installs pop3frame
#     pg_ctlcluster 15 main start                # the packaged cluster, if not running
#
# From the checkout (POP3FRAME: the pop3frame command; default: the one on the PATH):
#     POP3FRAME=.venv/bin/pop3frame bash docs/compose/one-host.sh           # check, then serve on 127.0.0.1:1100 until Ctrl-C
#     POP3FRAME=.venv/bin/pop3frame bash docs/compose/one-host.sh --check   # check, then stop everything
#
# The check: a user and two messages added with the CLI, LIST through
# HAProxy, and the cross-instance lock: while one session holds alice's
# mailbox, a second login through HAProxy (which sends it to the other
# instance) answers -ERR [IN-USE].  Everything this script starts is
# stopped by its PID when it exits; the role and database stay.
set -euo pipefail

N=${N:-2}                                   # pop3frame instances
FRONT_PORT=${FRONT_PORT:-1100}              # HAProxy, for clients
FIRST_PORT=${FIRST_PORT:-1111}              # instance i listens on FIRST_PORT + i - 1
POP3FRAME=${POP3FRAME:-pop3frame}
PSQL_ADMIN=${PSQL_ADMIN:-"runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d postgres"}
export PGPASSWORD=${PGPASSWORD:-one-host-example}   # production: ~/.pgpass or an EnvironmentFile
DSN="host=127.0.0.1 dbname=mail user=pop3frame"

# -- PostgreSQL: one role, one database (pop3frame creates its tables) -----------
cd /   # psql as the postgres user may not read the current directory
$PSQL_ADMIN <<SQL
SELECT 'CREATE ROLE pop3frame LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pop3frame')\gexec
ALTER ROLE pop3frame PASSWORD '$PGPASSWORD';
SELECT 'CREATE DATABASE mail OWNER pop3frame' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mail')\gexec
SQL

WORK=$(mktemp -d /tmp/pop3frame-one-host.XXXXXX)
PIDS=()
stop() {
    # Our own children, by PID: SIGTERM lets pop3frame release its locks and exit 0.
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    echo "stopped; logs in $WORK"
}
trap stop EXIT
trap 'exit 130' INT TERM

# -- pop3frame: one config file for every instance ---------------------------------
# PostgreSQL's max_connections (100 on Debian) must hold every instance's
# pool plus its lock connection:  N x (max_connections + 1) <= 100 - 3 reserved - admin.
cat > "$WORK/pop3frame.toml" <<TOML
shutdown_grace = 10

[adapter]
type = "postgres"
dsn = "$DSN"

[locks]
backend = "postgres"
dsn = "$DSN"

[server]
max_connections = 40    # one thread per connection; the pool follows it
TOML

for i in $(seq 1 "$N"); do
    port=$((FIRST_PORT + i - 1))
    # The listener comes from the flag: only the port differs between instances.
    $POP3FRAME serve --config "$WORK/pop3frame.toml" --proxy-listen "127.0.0.1:$port" \
        2> "$WORK/pop3frame-$i.log" &
    PIDS+=($!)
done

# -- HAProxy ------------------------------------------------------------------------
{
    cat <<CFG
defaults
    mode tcp
    timeout connect 5s
    # POP3 autologout is at least 10 minutes (RFC 1939 section 3).
    timeout client 15m
    timeout server 15m
    # A connection refused by a dead instance is retried on another one.
    retries 2
    option redispatch

frontend pop3
    bind 127.0.0.1:$FRONT_PORT
    default_backend pop3frame

backend pop3frame
    balance leastconn
    # The check sends a PROXY v2 LOCAL header, reads the greeting and QUITs.
    option tcp-check
    tcp-check expect string +OK
    tcp-check send "QUIT\\r\\n"
    tcp-check expect string +OK
CFG
    for i in $(seq 1 "$N"); do
        echo "    server i$i 127.0.0.1:$((FIRST_PORT + i - 1)) send-proxy-v2 check check-send-proxy inter 5s"
    done
} > "$WORK/haproxy.cfg"
haproxy -c -q -f "$WORK/haproxy.cfg"

# Every instance logs "listening on" once its port is open (bounded wait).
for i in $(seq 1 "$N"); do
    for _ in $(seq 300); do
        grep -q "listening on" "$WORK/pop3frame-$i.log" && break
        kill -0 "${PIDS[$((i - 1))]}" 2>/dev/null || break
        sleep 0.1
    done
    grep -q "listening on" "$WORK/pop3frame-$i.log" || { cat "$WORK/pop3frame-$i.log"; exit 1; }
done
# -D returns once HAProxy listens; it runs on as the PID in the pid file.
haproxy -D -p "$WORK/haproxy.pid" -f "$WORK/haproxy.cfg"
PIDS+=("$(cat "$WORK/haproxy.pid")")

# -- users and mail, from any host that reaches the database --------------------------
$POP3FRAME user del --postgres "$DSN" alice 2>/dev/null || true
$POP3FRAME user add --postgres "$DSN" alice --password-stdin <<< 'alice-pw'
printf 'Subject: one\n\nfirst\n' | $POP3FRAME deliver --postgres "$DSN" alice
printf 'Subject: two\n\nsecond\n' | $POP3FRAME deliver --postgres "$DSN" alice
$POP3FRAME user list --postgres "$DSN"

# -- through HAProxy ----------------------------------------------------------------------
echo "LIST through HAProxy:"
curl -sS --max-time 30 "pop3://127.0.0.1:$FRONT_PORT/" -u alice:alice-pw

# Hold alice's mailbox on one instance (a raw session on fd 3), then log in
# again on fd 4: leastconn sends the second connection to another instance.
pop3_login() {  # fd: USER/PASS on an open connection, print the PASS reply
    local greeting reply
    read -r -t 30 greeting <&"$1"
    printf 'USER alice\r\nPASS alice-pw\r\n' >&"$1"
    read -r -t 30 reply <&"$1"
    read -r -t 30 reply <&"$1"
    echo "${reply%$'\r'}"
}
exec 3<>"/dev/tcp/127.0.0.1/$FRONT_PORT"
echo "session 1: $(pop3_login 3)"
exec 4<>"/dev/tcp/127.0.0.1/$FRONT_PORT"
echo "session 2: $(pop3_login 4)"
printf 'QUIT\r\n' >&4; exec 4>&-
printf 'QUIT\r\n' >&3; exec 3>&-
for i in $(seq 1 "$N"); do
    grep -h "login 'alice'\|IN-USE\|in use" "$WORK/pop3frame-$i.log" | sed "s/^/  instance $i: /" || true
done

if [ "${1:-}" = "--check" ]; then
    exit 0
fi
echo "serving: pop3://127.0.0.1:$FRONT_PORT (user alice, password alice-pw); Ctrl-C stops"
wait
