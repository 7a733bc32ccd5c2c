#!/usr/bin/env bash
# Sets everything up on a fresh machine and walks through byok_pg on the built-in
# local key provider: configure a tenant from its byok_config document, encrypt a
# column, read it back, rotate the data key, and see the errors that guard the data.
# Usage: bash scripts/demo.sh   (as root, or a user who can install into PostgreSQL)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
if [ "${1:-}" = "--stop" ]; then stop_cluster demo; exit 0; fi
ensure_toolchain
install_extension
PORT=54321
start_cluster demo $PORT
log "demo cluster on port $PORT (socket $BYOK_WORK/demo); server log: $BYOK_WORK/demo/server.log"
psql_at demo $PORT -d postgres -v ON_ERROR_STOP=0 -e -f "$BYOK_ROOT/scripts/demo.sql"
# 8. Revocation: the customer revokes its master key. For the local provider its
#    switch is the revocation list beside the key file; the cached key (24 h TTL)
#    stops working within revocation_check_seconds + 1 s, and comes back alone.
REVOKED="$BYOK_WORK/demo/data/byok_local_master.key.revoked"
log "8. the customer revokes master key acme-cmk-1 (a line in $REVOKED)"
as_postgres sh -c "echo acme-cmk-1 > '$REVOKED'"
sleep 3
psql_at demo $PORT -d postgres -v ON_ERROR_STOP=0 -e <<'SQL'
SELECT byok.decrypt_text(diagnosis, 'patients.diagnosis') FROM patients WHERE id = 1;
SELECT tenant_id, status, reason, last_checked_at::time(0), last_ok_at::time(0) FROM byok.tenant_key_status;
SQL
log "8. the customer enables it again (the line removed)"
as_postgres rm -f "$REVOKED"
sleep 3
psql_at demo $PORT -d postgres -v ON_ERROR_STOP=0 -e <<'SQL'
SELECT byok.decrypt_text(diagnosis, 'patients.diagnosis') FROM patients WHERE id = 1;
SELECT tenant_id, status FROM byok.tenant_key_status;
SELECT logged_at::time(0), event, outcome, left(reason, 70) AS reason FROM byok.audit_log
 WHERE event LIKE 'master_key_%' ORDER BY id;
SQL
log "demo done. Connect with: psql -h $BYOK_WORK/demo -p $PORT -U postgres"
log "stop it with: bash scripts/demo.sh --stop   (or pg_ctl -D $BYOK_WORK/demo/data stop as postgres)"
