#!/usr/bin/env bash
# A hostile byok_admin against the server's files and network identity, and
# what a core dump or a refused key would give away:
# - a Vault tenant pointed at a listener of the attacker's, with the server's
#   local master key file as its "token": nothing reaches the listener;
# - inside byok.credential_directories: a symbolic link to the key file, a
#   linked directory, a file others may read, a file of another OS user:
#   refused; a proper file works
#   (and its token reaches the configured endpoint, which the superuser allowed);
# - memory holding plaintext keys is marked MADV_DONTDUMP in backends, and the
#   key broker (which holds them all) does not dump core at all;
# - a key the key manager refuses is not asked for again on every row.
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
set +e   # every outcome is checked below
PORT=54361
NAME=hostile
LISTEN_PORT=18370
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
q() { psql_at $NAME $PORT -d postgres -qAt "$@"; }
as_admin() { psql_at $NAME $PORT -d postgres -qAt -U thief "$@"; }

FIXTURES="$BYOK_WORK/hostile-fixtures"
CREDS="$FIXTURES/credentials"
rm -rf "$FIXTURES"; mkdir -p "$CREDS"; chown -R postgres "$FIXTURES"; chmod 700 "$CREDS"
# A listener of the attacker's: records every request it gets.
"$PY" - "$LISTEN_PORT" "$FIXTURES/received" <<'PY' &
import http.server, sys
port, out = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def _any(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with open(out, "a") as f:
            f.write(f"{self.command} {self.path} token={self.headers.get('X-Vault-Token')} {body[:200]!r}\n")
        self.send_response(403); self.send_header("Content-Type", "application/json"); self.end_headers()
        self.wfile.write(b'{"errors": ["permission denied"]}')
    do_GET = do_POST = do_PUT = _any
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
PY
LISTENER=$!
trap 'kill $LISTENER 2>/dev/null; stop_cluster $NAME' EXIT
# The superuser's policy: credentials from $CREDS only; the local listener is an
# allowed endpoint (as a real Vault server would be), over plain http (tests).
# No background revocation checks: a check landing while the key file is
# swapped below would (rightly) call the refusal a revocation, with another
# message than the negative cache's under test (revocation.sh tests those).
start_cluster $NAME $PORT "byok.credential_directories = '$CREDS'" \
    "byok.allowed_endpoints = '127.0.0.1:$LISTEN_PORT'" "byok.allow_insecure_transport = on" \
    "byok.revocation_check_seconds = 0"
q -c "CREATE EXTENSION byok_pg" -c "CREATE ROLE thief LOGIN IN ROLE byok_admin" >/dev/null
DATA="$BYOK_WORK/$NAME/data"
q -c "SELECT byok.configure_tenant('{\"customer\":\"c\",\"tenant_id\":\"local_t\",\"encryption\":{\"provider\":\"local\",\"local\":{\"key_id\":\"k\"}}}')" >/dev/null
test -s "$DATA/byok_local_master.key" && ok "the local master key file exists (what the attacker is after)" || not_ok "no key file"

vault() { # vault TENANT TOKEN_FILE
    printf '{"customer":"c","tenant_id":"%s","encryption":{"provider":"vault","vault":{"address":"http://127.0.0.1:%s","key_name":"k","auth":{"method":"token","token_file":"%s"}}}}' "$1" "$LISTEN_PORT" "$2"
}
attempt() { as_admin -v VERBOSITY=verbose -c "SELECT byok.configure_tenant('$(vault "$1" "$2")')" 2>&1; }

echo "== the key file itself, and a path that climbs out of the directory"
for path in "$DATA/byok_local_master.key" "$CREDS/../../$NAME/data/byok_local_master.key"; do
    err=$(attempt t1 "$path")
    grep -q "42501:.*not inside a directory listed in byok.credential_directories" <<<"$err" && ok "refused: $path" || not_ok "$path: $err"
done
test ! -s "$FIXTURES/received" && ok "the listener received nothing" || not_ok "the listener received: $(cat "$FIXTURES/received")"

echo "== inside the directory: links, loose modes, other owners"
ln -s "$DATA/byok_local_master.key" "$CREDS/link.token"
err=$(attempt t2 "$CREDS/link.token")
grep -q "42501:.*a symbolic link leads outside" <<<"$err" && ok "a symbolic link to the key file is refused" || not_ok "symlink: $err"
mkdir -p "$FIXTURES/elsewhere"; chown postgres "$FIXTURES/elsewhere"; ln -s "$DATA" "$CREDS/linked_dir"
err=$(attempt t2 "$CREDS/linked_dir/byok_local_master.key")
grep -q "42501:.*a symbolic link leads outside" <<<"$err" && ok "a symbolically linked directory is refused" || not_ok "linked dir: $err"
echo "loose" | as_postgres tee "$CREDS/loose.token" >/dev/null; chmod 644 "$CREDS/loose.token"
err=$(attempt t2 "$CREDS/loose.token")
grep -q "42501:.*mode is 0644; other users may read it" <<<"$err" && ok "a file others may read is refused" || not_ok "loose: $err"
echo "theirs" > "$CREDS/other.token"; chown nobody "$CREDS/other.token"; chmod 644 "$CREDS/other.token"
err=$(attempt t2 "$CREDS/other.token")
grep -q "42501:.*not owned by the server's OS user" <<<"$err" && ok "a file of another OS user is refused" || not_ok "owner: $err"
test ! -s "$FIXTURES/received" && ok "the listener still received nothing" || not_ok "the listener received: $(cat "$FIXTURES/received")"
echo "proper-token" | as_postgres tee "$CREDS/good.token" >/dev/null; as_postgres chmod 600 "$CREDS/good.token"
err=$(attempt t3 "$CREDS/good.token")
grep -q "token=proper-token" "$FIXTURES/received" && ok "a proper credential file is read and sent to the allowed endpoint" || not_ok "good file: $err / $(cat "$FIXTURES/received" 2>/dev/null)"
grep -q "$(head -c 16 "$DATA/byok_local_master.key")" "$FIXTURES/received" && not_ok "key material reached the listener" || ok "no key material ever reached the listener"

echo "== plaintext keys and core dumps"
# A session that decrypts: its key pages are excluded from core dumps.
out=$(q <<'SQL'
SELECT pg_backend_pid();
CREATE TEMP TABLE dd AS SELECT byok.encrypt_text('local_t', 'x') AS v;
SELECT byok.decrypt_text(v) FROM dd;
SELECT pg_sleep(2);
SQL
) &
reader=$!
sleep 1
backend=$(q -c "SELECT pid FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(2)%' LIMIT 1")
dd_regions=$(grep -c "^VmFlags:.* dd" "/proc/$backend/smaps" 2>/dev/null)
[ "${dd_regions:-0}" -ge 2 ] && ok "a decrypting backend has $dd_regions memory regions excluded from core dumps (the key slots and its key pages)" || not_ok "backend $backend: $dd_regions dd regions"
wait $reader
broker=$(q -c "SELECT broker_pid FROM byok.broker_status()")
[ "$(stat -c %U "/proc/$broker/status")" = root ] && [ "$(stat -c %U "/proc/$(head -1 "$DATA/postmaster.pid")/status")" = postgres ] \
    && ok "the key broker is not dumpable (its /proc files belong to root; the postmaster's to postgres)" \
    || not_ok "broker $broker: $(stat -c %U "/proc/$broker/status")"

echo "== a refused key is not asked for on every row"
q -c "CREATE TABLE refused AS SELECT byok.encrypt_text('local_t', 'v' || g) AS v FROM generate_series(1, 3) g" >/dev/null
cp "$DATA/byok_local_master.key" "$FIXTURES/key.saved"
# Another root secret: the key manager now refuses to unwrap this tenant's key.
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' | as_postgres tee "$DATA/byok_local_master.key" >/dev/null
q -c "SELECT byok.flush_cache()" >/dev/null
before=$(q -c "SELECT coalesce(sum(kms_calls), 0) FROM byok.metrics WHERE tenant_id = 'local_t'")
for _ in $(seq 1 50); do q -c "SELECT byok.decrypt_text(v) FROM refused LIMIT 1" >/dev/null 2>&1; done
after=$(q -c "SELECT coalesce(sum(kms_calls), 0) FROM byok.metrics WHERE tenant_id = 'local_t'")
calls=$((after - before))
[ "$calls" -le 3 ] && ok "50 refused reads cost the key manager $calls call(s)" || not_ok "50 refused reads made $calls key-manager calls"
err=$(q -v VERBOSITY=verbose -c "SELECT byok.decrypt_text(v) FROM refused LIMIT 1" 2>&1)
grep -q "refused by the key manager within the last" <<<"$err" && ok "the error says the refusal is remembered" || not_ok "$err"
install -o postgres -m 600 "$FIXTURES/key.saved" "$DATA/byok_local_master.key"
# Once the key is back, reads resume by themselves within the current backoff.
start=$(date +%s.%N); back=""
for _ in $(seq 1 350); do
    back=$(q -c "SELECT count(*) FROM refused WHERE byok.decrypt_text(v) LIKE 'v%'" 2>/dev/null)
    [ "$back" = 3 ] && break
    sleep 0.1
done
waited=$("$PY" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")
check "once the key is back, reads resume without an administrator (after ${waited} s)" "$back" "3"
exit $fail
