#!/usr/bin/env bash
# On demand (not in the test command: it downloads a Debian system): proves the
# package's promise on a machine that has never seen Rust. A fresh Debian 12
# (debootstrap --variant=minbase, from deb.debian.org) in a chroot gets Debian's
# PostgreSQL 15, then what the README says: apt-get install ./the.deb (its
# Depends come from the network, as on a server), one line in
# /etc/postgresql/15/main/postgresql.conf, a restart (pg_ctlcluster: no systemd
# in a chroot), the demo's SQL from the package. Checks that no Rust toolchain is there, the demo's values open, it
# fails exactly four times (on purpose) and the audit chain verifies.
# Usage: bash scripts/package-check-fresh.sh [DEB]   (as root; default: builds it
#        with scripts/package.sh). The chroot is in $BYOK_WORK/fresh-debian (about
#        400 MB) and is removed at the end; PORT (default 54397) is its server's.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
DEB="${1:-}"
PORT="${PORT:-54397}"
ROOT="$BYOK_WORK/fresh-debian"
PACKAGE="postgresql-${PG_MAJOR}-byok-pg"
[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot, mount)"
if [ -z "$DEB" ]; then
    bash "$BYOK_ROOT/scripts/package.sh" --out "$BYOK_WORK/package-fresh"
    DEB="$(ls "$BYOK_WORK"/package-fresh/"$PACKAGE"_*.deb)"
fi
[ -f "$DEB" ] || die "no package $DEB"
command -v debootstrap >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }

teardown() {
    chroot "$ROOT" pg_ctlcluster "$PG_MAJOR" main stop 2>/dev/null || true
    for m in dev/shm dev/pts dev proc; do if mountpoint -q "$ROOT/$m"; then umount "$ROOT/$m"; fi; done
    # (only once nothing is mounted below it; never across a file system boundary)
    if ! findmnt -rn -o TARGET | grep -q "^$ROOT/"; then rm -rf --one-file-system "$ROOT"; fi
}
trap teardown EXIT
teardown
log "fresh Debian 12 (debootstrap minbase) in $ROOT"
debootstrap --variant=minbase bookworm "$ROOT" http://deb.debian.org/debian >/dev/null \
    || die "debootstrap failed (network?)"
mount -t proc proc "$ROOT/proc"
mount --bind /dev "$ROOT/dev"; mount --bind /dev/pts "$ROOT/dev/pts"; mount -t tmpfs tmpfs "$ROOT/dev/shm"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"; chmod 755 "$ROOT/usr/sbin/policy-rc.d"   # no services started by apt
cp "$DEB" "$ROOT/root/"
in_root() { chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin bash -ec "$1"; }

log "Debian's PostgreSQL $PG_MAJOR, then the package as the README says"
in_root "apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql-$PG_MAJOR postgresql-client-$PG_MAJOR >/dev/null"
in_root "! command -v cargo && ! command -v rustc && ! test -e /usr/include/postgresql/$PG_MAJOR/server" >/dev/null \
    || die "the fresh system has a Rust toolchain or the server headers"
in_root "cd /root && apt-get install -y -qq ./$(basename "$DEB") >/dev/null"
in_root "sed -i 's/^port = .*/port = $PORT/' /etc/postgresql/$PG_MAJOR/main/postgresql.conf
         echo \"shared_preload_libraries = 'byok_pg'\" >> /etc/postgresql/$PG_MAJOR/main/postgresql.conf
         pg_ctlcluster $PG_MAJOR main restart"
as_pg() { chroot "$ROOT" runuser -u postgres -- "$@"; }
as_pg createdb -p "$PORT" byok_demo
as_pg psql -X -p "$PORT" -d byok_demo -e -v VERBOSITY=verbose -f "/usr/share/doc/$PACKAGE/examples/demo.sql" \
    > "$BYOK_WORK/fresh-debian-demo.out" 2>&1 || true
q() { as_pg psql -X -p "$PORT" -d byok_demo -qAt -c "$1"; }
status=0
errors="$(grep -c '^psql:.*ERROR:' "$BYOK_WORK/fresh-debian-demo.out" || true)"
values="$(q "SELECT string_agg(byok.decrypt_text(diagnosis, 'patients.diagnosis'), ',' ORDER BY id) FROM patients" 2>&1 || true)"
breaks="$(q "SELECT count(*) FROM byok.verify_audit_chain()" 2>&1 || true)"
echo "demo errors (four on purpose): $errors; values: $values; audit chain breaks: $breaks"
[ "$errors" = 4 ] && [ "$values" = "influenza,fracture,migraine,asthma" ] && [ "$breaks" = 0 ] || status=1
[ $status -eq 0 ] && log "fresh Debian 12: the package and one line ran the demo" \
    || { tail -30 "$BYOK_WORK/fresh-debian-demo.out"; log "fresh Debian 12: FAILED"; }
exit $status
