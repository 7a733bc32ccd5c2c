#!/usr/bin/env bash
# The Debian package (scripts/package.sh, docs/packaging.md), the way a DBA
# installs it on this machine's PostgreSQL 15:
#  1. builds postgresql-15-byok-pg_<version>_<arch>.deb and checks its fields,
#     its exact file list, its library's dependencies (every one a Debian
#     package's), lintian (clean but for packaging/lintian-overrides) and the
#     preinst's CPU check;
#  2. moves the development install (cargo pgrx install) aside, so the server
#     can only find the package's files;
#  3. apt-get install ./the.deb; a fresh cluster whose postgresql.conf gains one
#     line, shared_preload_libraries = 'byok_pg'; the demo's SQL from the
#     installed examples/demo.sql, with its results and its four deliberate
#     errors checked;
#  4. apt-get remove: no file left, the server refuses to start while it still
#     preloads byok_pg (README.Debian says so); reinstalled, the demo's values
#     open again (the package owns no data); removed;
#  5. an update as a DBA makes it: 0.1.0's package (0.1.0 built from its commit,
#     as upgrade.sh builds it, packaged by this script), a database with values,
#     then apt-get install ./the.deb over it, a restart, the values open under
#     the new library, ALTER EXTENSION byok_pg UPDATE, the values open, the new
#     functions work; removed: no file left;
#  6. puts the development install back, whatever failed.
# The package is built from the debug build the test command installed
# (scripts/package.sh --debug: the same packaging, without the release build's
# ten minutes on two cores); PACKAGE_PROFILE=release packages a release build,
# as scripts/package.sh does for a server. PACKAGE_PORT sets the cluster's port
# (default 54396).
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
set +e   # every outcome is checked below
NAME=package
PORT="${PACKAGE_PORT:-54396}"
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
cd "$BYOK_ROOT"
PACKAGE="postgresql-${PG_MAJOR}-byok-pg"
VERSION="$BYOK_VERSION"
OUT="$BYOK_WORK/package-out"
PKGLIB="/usr/lib/postgresql/${PG_MAJOR}/lib"
EXTDIR="/usr/share/postgresql/${PG_MAJOR}/extension"
DEV_ASIDE="$BYOK_WORK/package-dev-install"   # the development install while the package is tested
case "${PACKAGE_PROFILE:-debug}" in
    debug) PROFILE_FLAG=--debug ;;
    release) PROFILE_FLAG="" ;;
    *) die "PACKAGE_PROFILE is debug or release, not '$PACKAGE_PROFILE'" ;;
esac
export DEBIAN_FRONTEND=noninteractive

package_status() { dpkg-query -W -f='${db:Status-Abbrev}' "$PACKAGE" 2>/dev/null; }
package_installed() { [ "$(package_status)" = "ii " ]; }
byok_files() { ls -d "$PKGLIB"/byok_pg* "$EXTDIR"/byok_pg* "/usr/share/doc/$PACKAGE" 2>/dev/null; }
# The package purged whatever state dpkg left it in (half-installed, half-
# configured), then the development install copied back and compared; the copy
# set aside is deleted only once it is back. Fails (and keeps the copy) otherwise.
restore_dev_install() {
    stop_cluster "$NAME"
    local status; status="$(package_status)"
    if [ -n "$status" ] && [ "${status:1:1}" != n ]; then
        dpkg --purge --force-remove-reinstreq "$PACKAGE" >/dev/null 2>&1 \
            || { echo "NOT OK: could not purge $PACKAGE (dpkg status '$status')"; return 1; }
    fi
    [ -d "$DEV_ASIDE" ] || return 0
    if [ -e "$PKGLIB/byok_pg.so" ] && ! cmp -s "$PKGLIB/byok_pg.so" "$DEV_ASIDE/lib/byok_pg.so"; then
        echo "NOT OK: $PKGLIB/byok_pg.so is not the development install; the copy stays in $DEV_ASIDE"
        return 1
    fi
    cp -a "$DEV_ASIDE/lib/." "$PKGLIB/" && cp -a "$DEV_ASIDE/extension/." "$EXTDIR/" \
        && cmp -s "$PKGLIB/byok_pg.so" "$DEV_ASIDE/lib/byok_pg.so" \
        && rm -rf "$DEV_ASIDE" \
        || { echo "NOT OK: the development install could not be put back from $DEV_ASIDE"; return 1; }
}
trap 'restore_dev_install || exit 1' EXIT
# An earlier run that died before its trap: its package purged, its copy put
# back (or dropped, when a development install was made since).
restore_dev_install \
    || { [ -e "$PKGLIB/byok_pg.so" ] && ! package_installed && rm -rf "$DEV_ASIDE"; } \
    || die "the machine is not as an earlier package test left it (above)"

# --- 1. the package --------------------------------------------------------------
log "package: bash scripts/package.sh"
rm -rf "$OUT"
bash scripts/package.sh $PROFILE_FLAG --out "$OUT" || not_ok "scripts/package.sh failed"
DEB="$OUT/${PACKAGE}_${VERSION}_$(dpkg --print-architecture).deb"
[ -f "$DEB" ] || { not_ok "no $DEB"; exit 1; }
ok "built $(basename "$DEB") ($(du -k "$DEB" | cut -f1) KiB)"
check "Package" "$(dpkg-deb --field "$DEB" Package)" "$PACKAGE"
check "Version is the extension's" "$(dpkg-deb --field "$DEB" Version)" "$VERSION"
depends="$(dpkg-deb --field "$DEB" Depends)"
echo "Depends: $depends"
for dep in "postgresql-$PG_MAJOR" "libc6 (>= " "libgcc-s1 (>= " ca-certificates; do
    [[ ", $depends," == *", $dep"* ]] && ok "Depends names $dep" || not_ok "Depends lacks $dep: $depends"
done

# Exactly these files: the library, the control file, the install script, an
# update script from every earlier release in sql/, the documentation.
expected="$(
    echo "./usr/lib/postgresql/$PG_MAJOR/lib/byok_pg.so"
    echo "./usr/share/postgresql/$PG_MAJOR/extension/byok_pg.control"
    echo "./usr/share/postgresql/$PG_MAJOR/extension/byok_pg--$VERSION.sql"
    for f in sql/byok_pg--*--"$VERSION".sql; do echo "./usr/share/postgresql/$PG_MAJOR/extension/${f#sql/}"; done
    for f in README.Debian copyright rust-std-COPYRIGHT-library.html.gz changelog.gz upgrading.md.gz examples/demo.sql; do
        echo "./usr/share/doc/$PACKAGE/$f"
    done
    echo "./usr/share/lintian/overrides/$PACKAGE"
)"
got="$(dpkg-deb --contents "$DEB" | awk '$1 !~ /^d/ { print $6 }')"
check "the package's files" "$(sort <<<"$got")" "$(sort <<<"$expected")"
bad_modes="$(dpkg-deb --contents "$DEB" | awk '$1 !~ /^[-d]rw[-x]r-[-x]r-[-x]$/ || $2 != "root/root"')"
check "every file root-owned, world-readable, none writable but by root" "$bad_modes" ""
contents="$(dpkg-deb --contents "$DEB")"
grep -q '^-..x' <<<"$contents" && not_ok "executable files in the package" || ok "no executable files"

# The library as installed: stripped, and every library it links belongs to a
# Debian package (nothing from the build machine's Rust toolchain).
X="$OUT/extracted"; rm -rf "$X"; dpkg-deb -x "$DEB" "$X"
sections="$(readelf -S "$X$PKGLIB/byok_pg.so")"
[ -n "$sections" ] || not_ok "readelf cannot read byok_pg.so"
grep -q '\.symtab' <<<"$sections" && not_ok "byok_pg.so is not stripped" || ok "byok_pg.so is stripped"
linked="$(ldd "$X$PKGLIB/byok_pg.so")"
echo "$linked"
! grep -q "not found" <<<"$linked" && ok "ldd resolves every library" || not_ok "ldd: a library is not found"
for lib in $(awk '$2 == "=>" { print $3 }' <<<"$linked"); do
    owner="$(dpkg -S "$(readlink -f "$lib")" 2>/dev/null || dpkg -S "$lib" 2>/dev/null)"
    [ -n "$owner" ] && ok "$lib belongs to ${owner%%:*}" || not_ok "$lib belongs to no Debian package"
done
grep -q "^Files: statically linked crate aes-gcm " "$X/usr/share/doc/$PACKAGE/copyright" \
    && grep -q "^License: Apache-2.0" "$X/usr/share/doc/$PACKAGE/copyright" \
    && ok "copyright: byok_pg's license and the statically linked crates'" || not_ok "copyright file incomplete"

log "package: lintian"
lint_status=0
lint="$(lintian --fail-on error,warning --pedantic --display-info "$DEB" 2>&1)" || lint_status=$?
grep -v '^running with root privileges' <<<"$lint"
[ $lint_status -eq 0 ] && ! grep -qE '^[EW]: ' <<<"$lint" \
    && ok "lintian: no errors, no warnings" || not_ok "lintian failed (status $lint_status) or reports errors or warnings (above)"
lintian --pedantic --display-info --show-overrides "$DEB" 2>/dev/null | grep '^O: ' \
    | sed 's/^/  kept on purpose (packaging\/lintian-overrides): /'

# The preinst refuses a CPU the library cannot run on (a cpuinfo without AVX2
# and BMI2), names what is missing, accepts this machine's and can be overridden.
C="$OUT/control"; rm -rf "$C"; dpkg-deb -e "$DEB" "$C"
sed -e 's/ avx2 / /' -e 's/ bmi2 / /' /proc/cpuinfo > "$OUT/old-cpuinfo"
pre_status=0; pre_out="$(BYOK_PG_CPUINFO="$OUT/old-cpuinfo" "$C/preinst" install 2>&1)" || pre_status=$?
[ $pre_status -ne 0 ] && grep -q "lacks instructions byok_pg is built for: avx2 bmi2\." <<<"$pre_out" \
    && ok "preinst refuses a CPU without avx2 and bmi2, naming them" || not_ok "preinst on an older CPU: status $pre_status, $pre_out"
"$C/preinst" install && ok "preinst accepts this CPU" || not_ok "preinst refuses this CPU"
BYOK_PG_SKIP_CPU_CHECK=1 BYOK_PG_CPUINFO="$OUT/old-cpuinfo" "$C/preinst" install \
    && ok "preinst: BYOK_PG_SKIP_CPU_CHECK=1 skips the check" || not_ok "BYOK_PG_SKIP_CPU_CHECK=1 does not skip the check"

# --- 2. only the package's files -----------------------------------------------------
log "package: the development install set aside ($DEV_ASIDE)"
mkdir -p "$DEV_ASIDE/lib" "$DEV_ASIDE/extension"
for f in "$PKGLIB"/byok_pg*; do [ -e "$f" ] && mv "$f" "$DEV_ASIDE/lib/"; done
for f in "$EXTDIR"/byok_pg*; do [ -e "$f" ] && mv "$f" "$DEV_ASIDE/extension/"; done
check "no byok_pg file before the package" "$(byok_files)" ""

# --- 3. install, a fresh cluster, one line, the demo ----------------------------------
log "package: apt-get install ./$(basename "$DEB")"
apt-get install -y -qq "$DEB" >/dev/null 2>"$OUT/apt-install.err" || { cat "$OUT/apt-install.err"; not_ok "apt-get install failed"; }
package_installed && ok "dpkg: $PACKAGE installed" || { not_ok "dpkg: $PACKAGE not installed"; exit 1; }
verify="$(dpkg --verify "$PACKAGE" 2>&1)"
check "dpkg --verify: installed files match the package" "$verify" ""

# start_cluster's postgresql.conf: port and socket, fsync off, and the one line
# README.Debian asks for.
start_cluster "$NAME" "$PORT" || not_ok "the server did not start with the package's library"
grep -q "^shared_preload_libraries = 'byok_pg'" "$BYOK_WORK/$NAME/data/postgresql.conf" \
    && ok "postgresql.conf: shared_preload_libraries = 'byok_pg'" || not_ok "postgresql.conf lacks the shared_preload_libraries line"
q() { psql_at "$NAME" "$PORT" -d "$DB" -qAt -c "$1" 2>&1; }
DB=postgres
q "CREATE DATABASE byok_demo"
DEMO_SQL="/usr/share/doc/$PACKAGE/examples/demo.sql"
log "package: the demo's SQL ($DEMO_SQL)"
demo_out="$(psql_at "$NAME" "$PORT" -d byok_demo -v ON_ERROR_STOP=0 -v VERBOSITY=verbose -e -f "$DEMO_SQL" 2>&1)"
echo "$demo_out" > "$OUT/demo.out"
echo "$demo_out" | tail -12
errors="$(grep -E '^psql:.*ERROR:' <<<"$demo_out" | sed 's/^psql:[^ ]* //')"
echo "the demo's errors:"; echo "$errors"
check "the demo fails exactly four times, on purpose" "$(grep -c . <<<"$errors")" 4
# Wrong context, another tenant's session, a tampered value (22000), a role without the tenant's grant (42501).
check "the demo's errors' SQLSTATEs" "$(grep -o 'ERROR:  [0-9A-Z]\{5\}' <<<"$errors" | cut -c9- | tr '\n' ' ')" "22000 42501 22000 42501 "
DB=byok_demo
check "the demo's values open" \
    "$(q "SELECT string_agg(byok.decrypt_text(diagnosis, 'patients.diagnosis'), ',' ORDER BY id) FROM patients")" \
    "influenza,fracture,migraine,asthma"
check "the re-encryption job finished; all rows under one key" \
    "$(q "SELECT (SELECT string_agg(state, ',') FROM byok.jobs) || ' ' || count(DISTINCT byok.data_key_id(diagnosis)) FROM patients")" "done 1"
check "the audit chain verifies" "$(q "SELECT count(*) FROM byok.verify_audit_chain()")" 0
check "the extension's version" "$(q "SELECT extversion FROM pg_extension WHERE extname = 'byok_pg'")" "$VERSION"
check "the key broker runs and served the demo (the package's library is the only one there is)" \
    "$(q "SELECT broker_pid > 0 AND requests_served > 0 FROM byok.broker_status()")" t
for f in $(cd sql && ls byok_pg--*--"$VERSION".sql); do
    from="${f#byok_pg--}"; from="${from%%--*}"
    check "ALTER EXTENSION UPDATE path from $from" \
        "$(q "SELECT path FROM pg_extension_update_paths('byok_pg') WHERE source = '$from' AND target = '$VERSION'")" "$from--$VERSION"
done
stop_cluster "$NAME"

# --- 4. remove, the data outlives the package ------------------------------------------
log "package: apt-get remove $PACKAGE"
apt-get remove -y -qq "$PACKAGE" >/dev/null 2>&1 || not_ok "apt-get remove failed"
package_installed && not_ok "still installed after apt-get remove" || ok "removed"
check "no byok_pg file left after apt-get remove" "$(byok_files)" ""
as_postgres "$PG_BIN/pg_ctl" -D "$BYOK_WORK/$NAME/data" -l "$BYOK_WORK/$NAME/server.log" -w -t 30 start >/dev/null 2>&1 \
    && not_ok "the server started without the preloaded library" \
    || { grep -q 'could not access file "byok_pg"' "$BYOK_WORK/$NAME/server.log" \
         && ok "without the package a server preloading byok_pg refuses to start (could not access file \"byok_pg\")" \
         || not_ok "the server did not start, for another reason: $(tail -3 "$BYOK_WORK/$NAME/server.log")"; }
stop_cluster "$NAME"
apt-get install -y -qq "$DEB" >/dev/null 2>&1 || not_ok "reinstalling failed"
restart_cluster "$NAME" || not_ok "the server did not start after reinstalling"
check "reinstalled: the values sealed before the removal open" \
    "$(q "SELECT string_agg(byok.decrypt_text(diagnosis, 'patients.diagnosis'), ',' ORDER BY id) FROM patients")" \
    "influenza,fracture,migraine,asthma"
stop_cluster "$NAME"
apt-get remove -y -qq "$PACKAGE" >/dev/null 2>&1 || not_ok "apt-get remove failed"


# --- 5. an update through the package manager: 0.1.0's package, then this one ------
# (0.1.0's library as upgrade.sh builds it, packaged by this tree's script)
build_release 0.1.0 "$RELEASE_0_1_0_COMMIT"
bash scripts/package.sh --from-stage "$RELEASE_STAGE" --out "$OUT/old" >/dev/null || not_ok "packaging 0.1.0 failed"
OLD_DEB="$(ls "$OUT"/old/"${PACKAGE}"_0.1.0_*.deb)"
log "package: apt-get install ./$(basename "$OLD_DEB"), data, then ./$(basename "$DEB") and ALTER EXTENSION UPDATE"
apt-get install -y -qq "$OLD_DEB" >/dev/null 2>"$OUT/apt-install.err" || { cat "$OUT/apt-install.err"; not_ok "apt-get install (0.1.0) failed"; }
start_cluster "$NAME" "$PORT" || not_ok "the server did not start with 0.1.0's package"
DB=postgres
q "CREATE EXTENSION byok_pg" >/dev/null
check "0.1.0 installed from its package" "$(q "SELECT extversion FROM pg_extension WHERE extname = 'byok_pg'")" 0.1.0
for i in 1 2 3 4 5; do   # (the first key-manager call waits for the key broker)
    q "SELECT byok.configure_tenant('{\"customer\":\"acme\",\"tenant_id\":\"acme\",\"encryption\":{\"provider\":\"local\",\"local\":{\"key_id\":\"acme-cmk\"}}}')" >/dev/null && break
    sleep 2
done
q "CREATE TABLE notes AS SELECT g AS id, byok.encrypt_text('acme', 'note ' || g, 'notes.body') AS body FROM generate_series(1, 50) g" >/dev/null
stop_cluster "$NAME"
apt-get install -y -qq "$DEB" >/dev/null 2>"$OUT/apt-install.err" || { cat "$OUT/apt-install.err"; not_ok "apt-get install (update to $VERSION) failed"; }
check "dpkg: updated to $VERSION" "$(dpkg-query -W -f='${db:Status-Abbrev}${Version}' "$PACKAGE")" "ii $VERSION"
check "the extension directory after the update: this version's scripts only" \
    "$(cd "$EXTDIR" && ls byok_pg* | LC_ALL=C sort)" \
    "$({ (cd sql && ls byok_pg--*--"$VERSION".sql); echo "byok_pg--$VERSION.sql"; echo byok_pg.control; } | LC_ALL=C sort)"
restart_cluster "$NAME" || not_ok "the server did not restart on the updated package"
values="$(q "SELECT count(*) FILTER (WHERE byok.decrypt_text(body, 'notes.body') = 'note ' || id) FROM notes")"
check "before ALTER EXTENSION UPDATE the new library serves 0.1.0's definitions" "$values" 50
q "ALTER EXTENSION byok_pg UPDATE" >/dev/null
check "ALTER EXTENSION byok_pg UPDATE: $VERSION" "$(q "SELECT extversion FROM pg_extension WHERE extname = 'byok_pg'")" "$VERSION"
check "after the update the 0.1.0 values open" "$(q "SELECT count(*) FILTER (WHERE byok.decrypt_text(body, 'notes.body') = 'note ' || id) FROM notes")" 50
check "after the update this version's functions work" "$(q "SELECT known_answer_passed FROM byok.crypto_info()")" t
stop_cluster "$NAME"
apt-get remove -y -qq "$PACKAGE" >/dev/null 2>&1 || not_ok "apt-get remove failed"
check "removed at the end: no byok_pg file left" "$(byok_files)" ""


# --- 6. the development install back (the trap) ------------------------------------
restore_dev_install || fail=1
[ -f "$PKGLIB/byok_pg.so" ] && ok "the development install is back" || not_ok "the development install was not restored"
[ $fail -eq 0 ] && echo "package: all checks passed" || echo "package: FAILED"
exit $fail
