#!/usr/bin/env bash
# The client recipes in clients/ (docs/clients.md), as an application uses
# them, against a real server: psycopg 3 in text and binary mode, asyncpg
# (binary protocol, binary COPY), SQLAlchemy's ORM (tests/clients/test_python.py,
# drivers pinned in tests/deps/requirements.txt) and node-postgres
# (tests/clients/node, pinned by its package-lock.json, installed with npm ci).
# The application connects as a role granted one tenant of two.
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
set +e   # every outcome is checked below
NAME=clients
PORT="${CLIENTS_PORT:-54380}"
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
trap 'stop_cluster "$NAME"' EXIT
cd "$BYOK_ROOT"

start_cluster "$NAME" "$PORT"
psql_at "$NAME" "$PORT" -d postgres -q >/dev/null <<'SQL'
CREATE EXTENSION byok_pg;
SELECT byok.configure_tenant('{"customer":"acme","tenant_id":"acme","encryption":{"provider":"local","local":{"key_id":"acme-cmk"}}}');
SELECT byok.configure_tenant('{"customer":"globex","tenant_id":"globex","encryption":{"provider":"local","local":{"key_id":"globex-cmk"}}}');
CREATE ROLE app LOGIN IN ROLE byok_user;
SELECT byok.grant_tenant('app', 'acme');
CREATE TABLE notes (id int PRIMARY KEY, body byok.encrypted);
CREATE TABLE patients (id int PRIMARY KEY, ssn byok.encrypted NOT NULL, note byok.encrypted);
GRANT ALL ON notes, patients TO app;
-- Transparent mode for the ORM test: accounts_decrypted reads and writes plaintext.
CREATE TABLE accounts (id serial PRIMARY KEY, tenant text NOT NULL, owner text NOT NULL,
                       iban byok.encrypted, memo byok.encrypted);
SELECT byok.protect_column('accounts', 'iban', 'tenant', 'accounts.iban');
SELECT byok.protect_column('accounts', 'memo', 'tenant', 'accounts.memo');
SELECT byok.make_transparent('accounts', tenant_column => 'tenant');
GRANT ALL ON accounts, accounts_decrypted TO app;
GRANT USAGE ON SEQUENCE accounts_id_seq TO app;
SQL
DSN="postgresql://app@127.0.0.1:$PORT/postgres"

log "clients: Python (psycopg, asyncpg, SQLAlchemy)"
"$PY" tests/clients/test_python.py "$DSN" || fail=1

log "clients: a dump of the transparent table restores without sealing anything twice"
psql_at "$NAME" "$PORT" -d postgres -q -c "CREATE DATABASE restored"
"$PG_BIN/pg_dump" -h "$BYOK_WORK/$NAME" -p "$PORT" -U postgres -d postgres > "$BYOK_WORK/clients-dump.sql" \
    2>"$BYOK_WORK/pg_dump.err" || not_ok "pg_dump: $(cat "$BYOK_WORK/pg_dump.err")"
psql_at "$NAME" "$PORT" -d restored -q -f "$BYOK_WORK/clients-dump.sql" >/dev/null 2>"$BYOK_WORK/restore.err" \
    || not_ok "restore: $(grep ERROR "$BYOK_WORK/restore.err" | head -3)"
q() { psql_at "$NAME" "$PORT" -d "$1" -qAt -c "$2"; }
check "restored: the same ciphertext, row for row" \
    "$(q restored "SELECT md5(string_agg(iban::text || coalesce(memo::text, '-'), ',' ORDER BY id)) FROM accounts")" \
    "$(q postgres "SELECT md5(string_agg(iban::text || coalesce(memo::text, '-'), ',' ORDER BY id)) FROM accounts")"
check "restored: every value opens once (not sealed twice)" \
    "$(q restored "SELECT count(*) FILTER (WHERE byok.decrypt_text(iban, 'accounts.iban') LIKE 'DE%') || '/' || count(*) FROM accounts")" \
    "$(q postgres "SELECT count(*) || '/' || count(*) FROM accounts")"
check "restored: the transparent view reads the restored values" \
    "$(q restored "SELECT count(*) FROM accounts_decrypted WHERE iban LIKE 'DE%'")" "$(q postgres "SELECT count(*) FROM accounts")"

log "clients: node-postgres ($(node --version 2>/dev/null || echo 'node missing'))"
if (cd tests/clients/node && npm ci --no-audit --no-fund --silent >/dev/null 2>"$BYOK_WORK/npm.log"); then
    node tests/clients/node/test_pg.mjs "$DSN" || fail=1
else
    not_ok "npm ci in tests/clients/node failed: $(tail -3 "$BYOK_WORK/npm.log")"
fi

[ $fail -eq 0 ] && echo "clients: all checks passed"
exit $fail
