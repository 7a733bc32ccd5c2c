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
SQL
DSN="postgresql://app@127.0.0.1:$PORT/postgres"

log "clients: Python (psycopg, asyncpg, SQLAlchemy)"
"$PY" tests/clients/test_python.py "$DSN" || fail=1

log "clients: node-postgres ($(node --version 2>/dev/null || echo 'node missing'))"
if (cd tests/clients/node && npm ci --no-audit --no-fund --silent >/dev/null 2>"$BYOK_WORK/npm.log"); then
    node tests/clients/node/test_pg.mjs "$DSN" || fail=1
else
    not_ok "npm ci in tests/clients/node failed: $(tail -3 "$BYOK_WORK/npm.log")"
fi

[ $fail -eq 0 ] && echo "clients: all checks passed"
exit $fail
