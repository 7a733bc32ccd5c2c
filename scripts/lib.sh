# Shared helpers for the set-up, demo, test and benchmark scripts. Source it.
# PostgreSQL refuses to run as root, so clusters belong to the unprivileged OS
# user "postgres" (created by Debian's package); scripts may run as root or as
# a user that can write the PostgreSQL install directories.
set -euo pipefail

BYOK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_MAJOR=15
PG_BIN="/usr/lib/postgresql/${PG_MAJOR}/bin"
PG_CONFIG="${PG_BIN}/pg_config"
# Everything a run creates lives here, outside the source tree, owned by postgres.
BYOK_WORK="${BYOK_WORK:-/tmp/byok_pg-work}"
# What the set-up installs: one list each for Debian packages, cargo tools and
# Python packages (tests/deps/). Nothing else is assumed to be on the machine.
BYOK_DEPS="$BYOK_ROOT/tests/deps"
# The tests' Python environment, built from tests/deps/requirements.txt. Scripts
# run Python and the emulators from here only ("$PY", "$BYOK_VENV/bin/..."), so a
# package installed by hand elsewhere on the machine cannot hide a missing entry.
BYOK_VENV="$BYOK_WORK/venv"
PY="$BYOK_VENV/bin/python3"
export PYTHONNOUSERSITE=1
unset PYTHONPATH PYTHONHOME
# Servers started from here run as production servers do: without
# RUST_BACKTRACE, which would add Rust backtraces to some errors' details.
unset RUST_BACKTRACE RUST_LIB_BACKTRACE

log() { printf '\n==> [%ss] %s\n' "$SECONDS" "$*"; }
die() { echo "ERROR: $*" >&2; exit 1; }

as_postgres() {
    if [ "$(id -un)" = postgres ]; then "$@"; else runuser -u postgres -- "$@"; fi
}

# deps_list FILE: the entries of a tests/deps list, comments and blank lines removed.
deps_list() { sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' "$BYOK_DEPS/$1"; }

# The extension's version (Cargo.toml; the control file's default_version and
# the Debian package's version follow it).
BYOK_VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$BYOK_ROOT/Cargo.toml" | head -1)"

# The pinned cargo-pgrx version (tests/deps/cargo-tools.txt); the pgrx crates must match it.
PGRX_VERSION="$(deps_list cargo-tools.txt | awk '$1 == "cargo-pgrx" { print $2 }')"

ensure_debian_packages() {
    local missing=() pkg
    for pkg in $(deps_list debian-packages.txt); do
        [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" == "install ok installed" ]] || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

ensure_cargo_tools() {
    local name version flags installed
    installed="$(cargo install --list 2>/dev/null)"
    while read -r name version flags; do
        if [[ "$installed" != *"$name v$version:"* ]]; then
            log "installing $name $version (cargo install; once)"
            # shellcheck disable=SC2086
            cargo install "$name" --version "=$version" --locked $flags
        fi
    done < <(deps_list cargo-tools.txt)
    grep -q "^pgrx = \"=$PGRX_VERSION\"" "$BYOK_ROOT/Cargo.toml" \
        || die "Cargo.toml's pgrx pin differs from cargo-pgrx $PGRX_VERSION in tests/deps/cargo-tools.txt"
}

# The Python environment: rebuilt from scratch whenever the requirements file
# changes (so a removed entry is really gone), installed without dependency
# resolution (the file lists every package) and checked with `pip check`.
ensure_python_env() {
    local want
    want="$(sha256sum "$BYOK_DEPS/requirements.txt" | cut -d' ' -f1)"
    if [ -x "$PY" ] && [ "$(cat "$BYOK_VENV/.requirements.sha256" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    log "building the tests' Python environment ($BYOK_VENV) from tests/deps/requirements.txt"
    mkdir -p "$BYOK_WORK"
    rm -rf "$BYOK_VENV"
    python3 -m venv "$BYOK_VENV" || die "python3 -m venv failed (Debian's python3-venv is in tests/deps/debian-packages.txt)"
    "$PY" -m pip install -q --disable-pip-version-check --no-deps -r "$BYOK_DEPS/requirements.txt" \
        || die "pip could not install tests/deps/requirements.txt"
    "$PY" -m pip check --disable-pip-version-check \
        || die "tests/deps/requirements.txt is incomplete: a package above needs one the file does not list"
    echo "$want" > "$BYOK_VENV/.requirements.sha256"
}

# What building the extension needs: the Debian packages, the cargo tools and
# pgrx's registration of the system server (scripts/package.sh stops here).
ensure_build_tools() {
    ensure_debian_packages
    ensure_cargo_tools
    if ! [ -f "${PGRX_HOME:-$HOME/.pgrx}/config.toml" ] || ! grep -q "pg${PG_MAJOR}" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
        cargo pgrx init --pg${PG_MAJOR} "$PG_CONFIG" >/dev/null
    fi
}

# The listening ports the tests' servers and emulators use that fall inside
# Linux's ephemeral range (32768-60999): the test clusters (54300-54399) and the
# AWS KMS emulators (45660-45661). Below 32768 nothing needs reserving.
TEST_PORTS_IN_EPHEMERAL_RANGE="45660-45661,54300-54399"

# Keeps the kernel from handing those ports to outgoing connections: a client
# socket (a key broker's connection to an emulator, a test's HTTP call) that
# happened to get local port 54334 made a cluster fail to start with "Address
# already in use". Root only; elsewhere (or where /proc/sys is read-only) a
# note, and the tests run as before. Called by the test command only (it
# changes a kernel setting until reboot).
reserve_test_ports() {
    local file=/proc/sys/net/ipv4/ip_local_reserved_ports current
    current=$(cat "$file" 2>/dev/null) || return 0
    case ",$current," in *",$TEST_PORTS_IN_EPHEMERAL_RANGE,"*) return 0 ;; esac
    if ! echo "${current:+$current,}$TEST_PORTS_IN_EPHEMERAL_RANGE" > "$file" 2>/dev/null; then
        log "note: could not reserve ports $TEST_PORTS_IN_EPHEMERAL_RANGE from outgoing connections (not root?); a test cluster may rarely find its port taken"
    fi
}

# Everything the demo, the tests and the benchmarks need, from the three lists.
ensure_toolchain() {
    ensure_build_tools
    # Debian starts a default cluster on 5432; it is not ours and not needed.
    if command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | grep -q online; then
        pg_ctlcluster "${PG_MAJOR}" main stop 2>/dev/null || true
    fi
    ensure_python_env
}

# Builds and installs the extension into the system PostgreSQL. PROFILE=release for benchmarks.
install_extension() {
    log "building and installing byok_pg (${PROFILE:-debug})"
    local flags=()
    [ "${PROFILE:-debug}" = release ] && flags+=(--release)
    (cd "$BYOK_ROOT" && cargo pgrx install --pg-config "$PG_CONFIG" "${flags[@]}" 2>&1 | grep -E "error|warning: unused|Finished installing" || true)
    test -f "/usr/lib/postgresql/${PG_MAJOR}/lib/byok_pg.so"
}

# Citus, for tests/scripts/citus.sh: built from the vendored source
# (../shared/vendor beside the checkout, or /work/shared/vendor; BYOK_CITUS_VENDOR elsewhere) and
# installed into the system PostgreSQL, once per machine (the build is cached
# in /var/tmp/byok_pg-citus-build, whatever BYOK_WORK is). Its build
# dependencies are in tests/deps.
ensure_citus() {
    local vendor="" dir
    for dir in ${BYOK_CITUS_VENDOR:-} "$BYOK_ROOT/../shared/vendor" /work/shared/vendor; do
        [ -f "$dir/build-citus.sh" ] && { vendor=$dir; break; }
    done
    [ -n "$vendor" ] \
        || die "the Citus source is not in ../shared/vendor or /work/shared/vendor (set BYOK_CITUS_VENDOR to the directory holding build-citus.sh)"
    log "Citus 13.2.2 from $vendor (built once, then cached)"
    PG_CONFIG="$PG_CONFIG" bash "$vendor/build-citus.sh" "${BYOK_CITUS_BUILD:-/var/tmp/byok_pg-citus-build}"
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

# private_postgres DIR: a copy of the system PostgreSQL under DIR with lib and
# extension directories of its own and no byok_pg in them, for a test that
# installs a package without touching the system's. PostgreSQL 15 finds its
# share and lib directories relative to its binaries: the binaries are copied
# (so they resolve to DIR), the other files linked. Sets PG_BIN, PKGLIB, EXTDIR.
private_postgres() {
    local dir=$1 f
    local sys_lib="/usr/lib/postgresql/${PG_MAJOR}" sys_share="/usr/share/postgresql/${PG_MAJOR}"
    rm -rf "$dir"
    mkdir -p "$dir$sys_lib/lib" "$dir$sys_share/extension"
    cp -a "$sys_lib/bin" "$dir$sys_lib/"
    for f in "$sys_lib"/lib/* "$sys_share"/* "$sys_share"/extension/*; do
        case "$f" in */byok_pg*|"$sys_share/extension") continue ;; esac
        ln -s "$f" "$dir${f%/*}/"
    done
    chmod -R a+rX "$dir"
    PG_BIN="$dir$sys_lib/bin"
    PKGLIB="$dir$sys_lib/lib"
    EXTDIR="$dir$sys_share/extension"
    [ "$("$PG_BIN/pg_config" --pkglibdir)" = "$PKGLIB" ] || die "the private PostgreSQL is not relocated (pg_config --pkglibdir)"
}

# restart_cluster NAME: stops and starts a cluster start_cluster made (a new library loads).
restart_cluster() {
    local dir="$BYOK_WORK/$1"
    stop_cluster "$1"
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
