#!/usr/bin/env bash
# The FIPS build (cargo feature `fips`; docs/security.md, "FIPS build"), tested
# the way a regulated customer would switch to it and back:
#  1. the core crates' tests with the feature: sealing, opening, search terms
#     and the local provider's key derivation and wrapping through aws-lc's FIPS
#     module (nonces drawn inside it), NIST and RFC known answers;
#  2. packages the extension with --features fips and installs the standard
#     build (the system's, as install_extension left it) into a private copy of
#     PostgreSQL (never the system's);
#  3. on the standard build: a local tenant, short and long values, searchable
#     values;
#  4. the FIPS library replaces it, restart: byok.crypto_info() reports the
#     module in FIPS mode with its self-tests passed; the standard build's
#     values open and its search terms match; new values (short, long,
#     searchable) seal; a new tenant's data key is generated and wrapped;
#     byok.aes_gcm_implementation = rustcrypto changes nothing;
#  5. back on the standard build: everything the FIPS build sealed and wrapped
#     opens.
# FIPS_PORT sets the cluster's port (default 54360).
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
NAME=fips
PORT="${FIPS_PORT:-54360}"
F="$BYOK_WORK/fips-build"
trap 'stop_cluster "$NAME"' EXIT
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
cd "$BYOK_ROOT"
set +e   # every outcome is checked below
mkdir -p "$F"

# --- 1. the core crates with the FIPS module ------------------------------------
log "fips: byok-core and byok-kms unit tests with --features fips"
cargo test -q -p byok-core -p byok-kms --features fips 2>&1 | tee "$F/cargo-test.log" | grep -E "^test result|FAILED|panicked" || true
if grep -qE "FAILED|panicked|^error(\[|:)" "$F/cargo-test.log" || ! grep -q "^test result: ok" "$F/cargo-test.log"; then
    not_ok "unit tests with --features fips"
else
    ok "unit tests with --features fips"
fi

# --- 2. the FIPS package and a private PostgreSQL with the standard build -------
log "fips: packaging byok_pg with --features fips (debug)"
rm -rf "$F/pkg"
cargo pgrx package --debug --features fips --pg-config "$PG_CONFIG" --out-dir "$F/pkg" 2>&1 | grep -E "^error|Finished" || true
fips_so="$F/pkg/usr/lib/postgresql/${PG_MAJOR}/lib/byok_pg.so"
[ -f "$fips_so" ] || die "packaging the FIPS build failed"
cp "/usr/lib/postgresql/${PG_MAJOR}/lib/byok_pg.so" "$F/standard.so"
nm "$fips_so" | grep "aws_lc_fips_.*EVP_aead_aes_256_gcm_randnonce" >/dev/null \
    && ok "the FIPS library carries the FIPS module" || not_ok "no FIPS module symbols in the FIPS library"

private_postgres "$F/pg"
install -m 755 "$F/standard.so" "$PKGLIB/byok_pg.so"
install -m 644 "/usr/share/postgresql/${PG_MAJOR}/extension/"byok_pg* "$EXTDIR/"
start_cluster "$NAME" "$PORT"
q() { psql_at "$NAME" "$PORT" -d postgres -qAt -c "$1"; }
use_library() { # use_library standard|fips
    local so="$F/standard.so"; [ "$1" = fips ] && so="$fips_so"
    stop_cluster "$NAME"
    install -m 755 "$so" "$PKGLIB/byok_pg.so"
    restart_cluster "$NAME"
}

# --- 3. data sealed by the standard build ---------------------------------------
log "fips: values sealed by the standard build"
psql_at "$NAME" "$PORT" -d postgres -q >/dev/null <<'SQL'
CREATE EXTENSION byok_pg;
SELECT byok.configure_tenant('{"customer":"acme","tenant_id":"acme","encryption":{"provider":"local","local":{"key_id":"acme-cmk"}}}');
SELECT byok.rotate_index_key('acme');
CREATE TABLE v (id int PRIMARY KEY, tenant text NOT NULL DEFAULT 'acme', built text, len int, plain text,
                sealed byok.encrypted, email byok.encrypted);
SELECT byok.protect_column('v', 'email', 'tenant', 'v.email');
SELECT byok.make_searchable('v', 'email');
INSERT INTO v (id, built, len, plain, sealed, email) SELECT g, 'standard', l, repeat(md5(g::text), l / 32 + 1)::varchar(10000),
       NULL, byok.encrypt_text('acme', 'user' || g || '@example.com', 'v.email', searchable => true)
  FROM generate_series(1, 6) g, LATERAL (SELECT (ARRAY[0, 1, 100, 383, 1000, 5000])[g]) x(l);
UPDATE v SET plain = left(plain, len), sealed = byok.encrypt_text('acme', left(plain, len), 'v.plain');
SQL
check "standard build: crypto_info" "$(q "SELECT fips_build || ' ' || fips_mode || ' ' || known_answer_passed FROM byok.crypto_info()")" "false false true"

# --- 4. the FIPS build ------------------------------------------------------------
log "fips: the FIPS library, the same data"
use_library fips
check "FIPS build: crypto_info" \
    "$(q "SELECT fips_build || ' ' || fips_mode || ' ' || known_answer_passed || ' ' || coalesce(problem, '-') || ' ' || (module LIKE 'AWS-LC FIPS %') FROM byok.crypto_info()")" \
    "true true true - true"
q "SELECT module || ' | ' || aes_gcm FROM byok.crypto_info()"
check "FIPS build: the standard build's values open" \
    "$(q "SELECT count(*) FILTER (WHERE byok.decrypt_text(sealed, 'v.plain') = plain) || '/' || count(*) FROM v")" "6/6"
check "FIPS build: the standard build's search terms match its probes" \
    "$(q "SELECT string_agg(id::text, ',' ORDER BY id) FROM v WHERE byok.matches(email, 'acme', 'user5@example.com', 'v.email')")" "5"
psql_at "$NAME" "$PORT" -d postgres -q >/dev/null <<'SQL'
INSERT INTO v (id, built, len, plain, sealed, email) SELECT 10 + id, 'fips', len, plain, byok.encrypt_text('acme', plain, 'v.plain'),
       byok.encrypt_text('acme', 'user' || (10 + id) || '@example.com', 'v.email', searchable => true)
  FROM v WHERE built = 'standard';
SELECT byok.configure_tenant('{"customer":"initech","tenant_id":"initech","encryption":{"provider":"local","local":{"key_id":"initech-cmk"}}}');
CREATE TABLE w AS SELECT g AS id, byok.encrypt_text('initech', 'w' || g, 'w.v') AS v FROM generate_series(1, 20) g;
SQL
check "FIPS build: its own values open" \
    "$(q "SELECT count(*) FILTER (WHERE byok.decrypt_text(sealed, 'v.plain') = plain) || '/' || count(*) FROM v WHERE built = 'fips'")" "6/6"
check "FIPS build: a value and its FIPS twin differ (fresh nonces)" \
    "$(q "SELECT count(*) FROM v a JOIN v b ON b.id = a.id + 10 WHERE a.sealed::text = b.sealed::text")" "0"
check "FIPS build: a probe finds values from both builds" \
    "$(q "SELECT string_agg(id::text, ',' ORDER BY id) FROM v WHERE byok.term(email) IN (byok.search_term('acme', 'user3@example.com', 'v.email'), byok.search_term('acme', 'user13@example.com', 'v.email'))")" "3,13"
check "FIPS build: byok.aes_gcm_implementation = rustcrypto changes nothing" \
    "$(q "SET byok.aes_gcm_implementation = rustcrypto; SELECT count(*) FILTER (WHERE byok.decrypt_text(byok.encrypt_text('acme', plain, 'v.plain'), 'v.plain') = plain AND byok.decrypt_text(sealed, 'v.plain') = plain) FROM v")" "12"
for id in 12 15; do   # (1 and 1000 bytes)
    expect_error "FIPS build: a tampered value is refused (value $id)" 22000 "authentication failed" \
        "SELECT byok.decrypt_text(('byok:' || encode(set_byte(r, length(r) - 1, get_byte(r, length(r) - 1) # 1), 'base64'))::byok.encrypted, 'v.plain')
           FROM (SELECT byok.encrypted_send(sealed) r FROM v WHERE id = $id) x"
done

# --- 5. back to the standard build ----------------------------------------------
log "fips: back on the standard library"
use_library standard
check "standard build: the FIPS build's values open" \
    "$(q "SELECT count(*) FILTER (WHERE byok.decrypt_text(sealed, 'v.plain') = plain) || '/' || count(*) FROM v")" "12/12"
check "standard build: the key the FIPS build wrapped unwraps" \
    "$(q "SELECT count(*) FILTER (WHERE byok.decrypt_text(v, 'w.v') = 'w' || id) FROM w")" "20"
check "standard build: the FIPS build's search terms match" \
    "$(q "SELECT string_agg(id::text, ',' ORDER BY id) FROM v WHERE byok.matches(email, 'acme', 'user14@example.com', 'v.email')")" "14"

[ $fail -eq 0 ] && echo "fips: all checks passed"
exit $fail
