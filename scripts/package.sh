#!/usr/bin/env bash
# Builds the Debian package postgresql-15-byok-pg_<version>_<arch>.deb from a
# release build, for servers that install extensions with apt and have no Rust
# toolchain (docs/packaging.md):
#   /usr/lib/postgresql/15/lib/byok_pg.so            the library (stripped)
#   /usr/share/postgresql/15/extension/byok_pg*      control file, install script,
#                                                    update scripts from earlier releases
#   /usr/share/doc/postgresql-15-byok-pg/            README.Debian (the one line for
#       postgresql.conf), copyright (byok_pg's and every statically linked crate's
#       license, and rust-std-COPYRIGHT-library.html.gz, the Rust standard library's),
#       changelog.gz, upgrading.md.gz, examples/demo.sql (the demo, runnable with psql)
#   /usr/share/lintian/overrides/postgresql-15-byok-pg  the lintian tags we keep, explained
# Depends: postgresql-15, the C libraries the library links (dpkg-shlibdeps) and
# ca-certificates (the key managers' TLS certificates are checked against it).
# preinst (packaging/preinst) refuses to install on a CPU without x86-64-v3,
# AES-NI and PCLMULQDQ, which the library is built for.
# Usage: bash scripts/package.sh [--out DIR]    (default: target/debian)
#        bash scripts/package.sh --from-stage DIR [--out DIR]
#   --from-stage: package a build `cargo pgrx package` already staged in DIR
#   (copied, not changed) instead of building this tree; the version is the one
#   its control file names. The update test packages an earlier release so.
#   --debug: package a debug build instead of the release build. For the test
#   command only (tests/scripts/package.sh): it reuses the build the tests
#   installed, where the release build takes ten minutes of the CI machine's two
#   cores; the packaging is the same. Never for a server: a debug build is slower.
# The package's version is the extension's (Cargo.toml); file dates are the
# commit's (SOURCE_DATE_EPOCH).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
OUT="$BYOK_ROOT/target/debian"
FROM_STAGE=""
PROFILE_FLAGS=()
PROFILE_NAME=release
while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || die "--out needs a directory"; OUT=$2; shift 2 ;;
        --from-stage) [ $# -ge 2 ] || die "--from-stage needs a directory"
                      FROM_STAGE="$(cd "$2" && pwd)" || die "no directory $2"; shift 2 ;;
        --debug) PROFILE_FLAGS=(--debug); PROFILE_NAME=debug; shift ;;
        *) die "usage: bash scripts/package.sh [--from-stage DIR | --debug] [--out DIR]" ;;
    esac
done
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
cd "$BYOK_ROOT"

PACKAGE="postgresql-${PG_MAJOR}-byok-pg"
if [ -n "$FROM_STAGE" ]; then
    VERSION="$(sed -n "s/^default_version = '\(.*\)'/\1/p" "$FROM_STAGE/usr/share/postgresql/${PG_MAJOR}/extension/byok_pg.control")"
    [ -n "$VERSION" ] || die "$FROM_STAGE holds no byok_pg.control with a default_version"
else
    VERSION="$BYOK_VERSION"
fi
ARCH="$(dpkg --print-architecture)"
MAINTAINER="${BYOK_PACKAGE_MAINTAINER:-byok_pg developers <byok-pg@users.noreply.github.com>}"
# Given to dpkg-deb only, not exported: the C build scripts (cc) rerun when it
# changes, so exporting it would rebuild everything at each commit.
DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
unset SOURCE_DATE_EPOCH
DEB="$OUT/${PACKAGE}_${VERSION}_${ARCH}.deb"

# --- the build (release unless --debug), staged as it installs ---------------
STAGE="$OUT/stage"
rm -rf "$STAGE" "$DEB"
if [ -n "$FROM_STAGE" ]; then
    ensure_debian_packages   # dpkg-dev, binutils
    log "package: byok_pg $VERSION as staged in $FROM_STAGE"
    mkdir -p "$STAGE"
    cp -a "$FROM_STAGE/usr" "$STAGE/"
else
    ensure_build_tools   # Debian packages (dpkg-dev, the server headers), cargo-pgrx
    log "package: $PROFILE_NAME build of byok_pg $VERSION (cargo pgrx package ${PROFILE_FLAGS[*]})"
    cargo pgrx package "${PROFILE_FLAGS[@]}" --pg-config "$PG_CONFIG" --out-dir "$STAGE" 2>&1 \
        | grep -E "^error|warning: unused|Finished" || true
fi
LIB="$STAGE/usr/lib/postgresql/${PG_MAJOR}/lib/byok_pg.so"
EXT="$STAGE/usr/share/postgresql/${PG_MAJOR}/extension"
[ -f "$LIB" ] || die "cargo pgrx package built no $LIB"
[ -f "$EXT/byok_pg--$VERSION.sql" ] || die "no install script byok_pg--$VERSION.sql in the build"
[ "$(sed -n "s/^default_version = '\(.*\)'/\1/p" "$EXT/byok_pg.control")" = "$VERSION" ] \
    || die "byok_pg.control's default_version is not $VERSION"
# Every update script ends at this version: a database of any earlier release updates in one step.
for f in "$EXT"/byok_pg--*--*.sql; do
    [ -e "$f" ] || continue
    [[ "$f" == *"--$VERSION.sql" ]] || die "update script $(basename "$f") does not lead to $VERSION"
done
ls "$EXT"/byok_pg--*--"$VERSION".sql >/dev/null 2>&1 || log "package: no update scripts (a first release)"
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$LIB"

# --- documentation ---------------------------------------------------------------
DOC="$STAGE/usr/share/doc/$PACKAGE"
mkdir -p "$DOC/examples" "$STAGE/usr/share/lintian/overrides"
sed -e "s/@VERSION@/$VERSION/g" -e "s/@PACKAGE@/$PACKAGE/g" -e "s/@PG_MAJOR@/$PG_MAJOR/g" \
    packaging/README.Debian > "$DOC/README.Debian"
cp scripts/demo.sql "$DOC/examples/demo.sql"
gzip -9n < docs/upgrading.md > "$DOC/upgrading.md.gz"
cp packaging/lintian-overrides "$STAGE/usr/share/lintian/overrides/$PACKAGE"
python3 scripts/package-copyright.py "pg${PG_MAJOR}" "$DOC/copyright"
gzip -9n < "$(rustc --print sysroot)/share/doc/rust/COPYRIGHT-library.html" > "$DOC/rust-std-COPYRIGHT-library.html.gz"
# A native package's changelog: this version's entry, dated at the commit.
{
    echo "byok-pg ($VERSION) unstable; urgency=medium"
    echo
    echo "  * byok_pg $VERSION. Updating a database from an earlier release:"
    echo "    ALTER EXTENSION byok_pg UPDATE (see README.Debian)."
    echo
    echo " -- $MAINTAINER  $(date -u -R -d "@$DATE_EPOCH")"
} | gzip -9n > "$DOC/changelog.gz"

# --- control file -------------------------------------------------------------
# dpkg-shlibdeps reads a source package's debian/control; a minimal one will do.
SHLIBS_DIR="$OUT/shlibdeps"
rm -rf "$SHLIBS_DIR"; mkdir -p "$SHLIBS_DIR/debian"
printf 'Source: byok-pg\n\nPackage: %s\nArchitecture: any\n' "$PACKAGE" > "$SHLIBS_DIR/debian/control"
shlibs="$(cd "$SHLIBS_DIR" && dpkg-shlibdeps -O "$LIB" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')"
[ -n "$shlibs" ] || die "dpkg-shlibdeps found no library dependencies for byok_pg.so"
rm -rf "$SHLIBS_DIR"

find "$STAGE" -type d -exec chmod 0755 {} +
find "$STAGE" -type f -exec chmod 0644 {} +
mkdir -p "$STAGE/DEBIAN"
cat > "$STAGE/DEBIAN/control" <<EOF
Package: $PACKAGE
Source: byok-pg
Version: $VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
Depends: postgresql-$PG_MAJOR, $shlibs, ca-certificates
Section: database
Priority: optional
Description: per-tenant column encryption for PostgreSQL $PG_MAJOR under customer-held keys
 byok_pg seals column values with AES-256-GCM under per-tenant data keys that
 are stored only wrapped by each tenant's own master key, kept in the tenant's
 key manager (AWS KMS, Azure Key Vault, Google Cloud KMS, HashiCorp Vault or
 OpenBao transit, or the built-in local provider). It rotates keys with
 resumable background jobs, stops reading a tenant whose key is revoked,
 keeps a chained audit trail and offers equality search on encrypted columns.
 .
 The server must load it at start: add byok_pg to shared_preload_libraries
 (see README.Debian). Needs an x86-64-v3 CPU with AES-NI and PCLMULQDQ.
EOF
(cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
    | xargs -0 md5sum) > "$STAGE/DEBIAN/md5sums"
chmod 0644 "$STAGE/DEBIAN/control" "$STAGE/DEBIAN/md5sums"
install -m 0755 packaging/preinst "$STAGE/DEBIAN/preinst"   # refuses a CPU the library cannot run on
SOURCE_DATE_EPOCH="$DATE_EPOCH" dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >/dev/null
rm -rf "$STAGE"
log "package: $DEB"
dpkg-deb --field "$DEB" Package Version Architecture Depends Installed-Size
