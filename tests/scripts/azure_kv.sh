#!/usr/bin/env bash
# The azure_kv provider end to end, through the extension and the key broker,
# against the Key Vault stand-in (tests/standins/azure_kv: HTTPS with a test CA,
# Entra ID token endpoint, real RSA-OAEP-256 and A256KW, versions, access
# policies, throttling). Service principal by secret and by certificate, a token
# file, Managed-HSM AES keys, rotation to a new key version, disabled key, wrong
# credentials, unknown key, missing permission, untrusted TLS, 429 with Retry-After,
# managed identity (App Service's token endpoint), replica vaults.
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
set +e   # every outcome is checked below
PORT=54345
AKV_PORT=18330
NAME=azure
TENANT=72f988bf-86f1-41af-91ab-2d7cd011db47
STANDIN="$(cd "$(dirname "$0")/../standins/azure_kv" && pwd)"
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
q() { psql_at $NAME $PORT -d postgres -qAt "$@"; }

FIXTURES="$BYOK_WORK/azure-fixtures"
rm -rf "$FIXTURES"; mkdir -p "$FIXTURES"; chown postgres "$FIXTURES" 2>/dev/null
: > "$FIXTURES/errors.log"
secret_file() { as_postgres tee "$1" >/dev/null; as_postgres chmod 600 "$1"; }

# Service principals, as an Entra ID admin would register them, with the vault's
# access policy: "platform" may get, wrapKey and unwrapKey; "reader" only get;
# "operator" manages keys (the az CLI's role in the guide).
head -c 24 /dev/urandom | base64 | secret_file "$FIXTURES/platform.secret"
head -c 24 /dev/urandom | base64 | secret_file "$FIXTURES/reader.secret"
head -c 24 /dev/urandom | base64 > "$FIXTURES/operator.secret"
head -c 24 /dev/urandom | base64 | secret_file "$FIXTURES/wrong.secret"
# The certificate principal: a self-signed certificate and its PKCS#8 key in one PEM.
"$PY" - "$FIXTURES" <<'PY'
import datetime, os, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
d = sys.argv[1]
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "byok-platform-cert")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
pem = cert.public_bytes(serialization.Encoding.PEM)
open(os.path.join(d, "platform-cert.pem"), "wb").write(pem)
open(os.path.join(d, "platform-sp.pem"), "wb").write(pem + key.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
PY
chown postgres "$FIXTURES/platform-sp.pem"; chmod 600 "$FIXTURES/platform-sp.pem"
secret() { tr -d '\n' < "$FIXTURES/$1.secret"; }
cat > "$FIXTURES/principals.json" <<JSON
{"tenant_id": "$TENANT", "principals": {
  "platform-app": {"secret": "$(secret platform)", "permissions": ["get", "wrapKey", "unwrapKey"]},
  "platform-cert-app": {"certificate_pem_file": "$FIXTURES/platform-cert.pem", "permissions": ["get", "wrapKey", "unwrapKey"]},
  "reader-app": {"secret": "$(secret reader)", "permissions": ["get"]},
  "operator-app": {"secret": "$(secret operator)", "permissions": ["get", "create", "update", "rotate", "wrapKey", "unwrapKey"]},
  "platform-mi-user": {"managed_identity": true, "permissions": ["get", "wrapKey", "unwrapKey"]}}}
JSON
# Managed identity as App Service provides it: a local token endpoint and its
# secret, in the server's environment (the SDK reads IDENTITY_ENDPOINT and
# IDENTITY_HEADER); the system-assigned identity is "platform-app".
MSI_HEADER=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
export IDENTITY_ENDPOINT="https://127.0.0.1:$AKV_PORT/msi/token" IDENTITY_HEADER="$MSI_HEADER"

"$PY" "$STANDIN/server.py" --port $AKV_PORT --state "$FIXTURES" --principals "$FIXTURES/principals.json" \
    --msi-principal platform-app --msi-header "$MSI_HEADER" 2> "$FIXTURES/standin.log" &
STANDIN_PID=$!
trap 'kill $STANDIN_PID 2>/dev/null; stop_cluster $NAME' EXIT
for _ in $(seq 1 200); do [ -s "$FIXTURES/ca.pem" ] && break; sleep 0.05; done
[ -s "$FIXTURES/ca.pem" ] || { echo "NOT OK: the Azure stand-in did not start:"; tail -5 "$FIXTURES/standin.log"; exit 1; }
# A credential file like any other: the server OS user's, mode 0600.
chown postgres "$FIXTURES/ca.pem"; chmod 600 "$FIXTURES/ca.pem"
URL="https://127.0.0.1:$AKV_PORT"
akv() { "$PY" "$STANDIN/akv.py" "$URL" "$FIXTURES/ca.pem" "$TENANT" operator-app "$FIXTURES/operator.secret" "$@"; }
akv_hook() { "$PY" "$STANDIN/akv.py" "$URL" "$FIXTURES/ca.pem" "$@"; }
field() { "$PY" -c "import json,sys; d=json.load(sys.stdin); print(eval('d'+sys.argv[1]))" "$1"; }

# The guide's key: az keyvault key create --kty RSA-HSM --size 2048 --ops encrypt decrypt wrapKey unwrapKey
V1=$(akv create-key platform-cmk RSA-HSM 2048 encrypt decrypt wrapKey unwrapKey | field "['key']['kid'].rsplit('/',1)[1]")
akv create-key hsm-aes oct-HSM 256 wrapKey unwrapKey >/dev/null
akv create-key sign-only RSA 2048 sign verify >/dev/null

# The server trusts the test fixtures with credentials, and the local
# emulators (plain http on 127.0.0.1) as endpoints: a production server
# allows neither (SECURITY.md).
# No background revocation checks by default: the stand-in's throttle hook
# answers the next unwrapKey calls with 429, whoever makes them, and a check
# landing in that moment took the 429s meant for the data path (the drill below
# sets its own interval).
start_cluster $NAME $PORT "byok.credential_directories = '$FIXTURES'" "byok.allowed_endpoints = '127.0.0.1'" "byok.allow_insecure_transport = on" \
    "byok.revocation_check_seconds = 0"
q -c "CREATE EXTENSION byok_pg" >/dev/null
config() { # config TENANT AZURE_BLOCK_JSON
    printf '{"customer":"acme_corp","tenant_id":"%s","encryption":{"provider":"azure_kv","azure_kv":%s,"key_rotation":{"enabled":true,"interval_days":90},"cache_config":{"ttl_seconds":86400,"max_entries":1000},"audit":{"log_all_operations":true,"alert_on_failures":true}}}' "$1" "$2"
}
# A vault reached by IP address: the challenge names vault.azure.net, so its check is off.
block() { # block KEY AUTH_JSON [EXTRA]
    printf '{"vault_url":"%s","key_name":"%s","authority_host":"%s","ca_cert_file":"%s","verify_challenge_resource":false,"auth":%s%s}' \
        "$URL" "$1" "$URL" "$FIXTURES/ca.pem" "$2" "${3:-}"
}
sp() { printf '{"method":"service_principal","tenant_id":"%s","client_id":"%s","client_secret_file":"%s"}' "$TENANT" "$1" "$FIXTURES/$2.secret"; }

echo "== service principal (client secret), from the guide-shaped document"
check "configure_tenant" "$(q -c "SELECT byok.configure_tenant('$(config az_sp "$(block platform-cmk "$(sp platform-app platform)")")')")" "az_sp"
q -c "CREATE TABLE az AS SELECT g AS id, byok.encrypt_text('az_sp', 'secret ' || g, 'az') AS v FROM generate_series(1, 100) g" >/dev/null
check "100 values round-trip" "$(q -c "SELECT count(*) FROM az WHERE byok.decrypt_text(v, 'az') = 'secret ' || id")" "100"
check "the data key records the key version that wrapped it" "$(q -c "SELECT provider, cmk_id, cmk_version FROM byok.data_keys WHERE tenant_id = 'az_sp'")" "azure_kv|platform-cmk|$V1"
q -c "SELECT byok.flush_cache()" >/dev/null
check "after a cache flush, unwrapKey at that version" "$(q -c "SELECT byok.decrypt_text(v, 'az') FROM az WHERE id = 7")" "secret 7"

echo "== replica_vault_urls: the vault cannot be reached, a replica holding the same keys answers"
REPLICA_BLOCK=$(printf '{"vault_url":"https://127.0.0.1:1","replica_vault_urls":["%s"],"key_name":"platform-cmk","authority_host":"%s","ca_cert_file":"%s","verify_challenge_resource":false,"auth":%s}' \
    "$URL" "$URL" "$FIXTURES/ca.pem" "$(sp platform-app platform)")
check "configure with a dead vault and a replica" "$(q -c "SELECT byok.configure_tenant('$(config az_replica "$REPLICA_BLOCK")')")" "az_replica"
q -c "SELECT byok.flush_cache()" >/dev/null
check "round trip through the replica" "$(q -c "SELECT byok.decrypt_text(byok.encrypt_text('az_replica', 'via the replica'))")" "via the replica"
check "served_by_replica counts it" "$(q -c "SELECT served_by_replica > 0 FROM byok.metrics WHERE tenant_id = 'az_replica'")" "t"

echo "== service principal (certificate: a signed client assertion)"
CERT_AUTH=$(printf '{"method":"service_principal","tenant_id":"%s","client_id":"platform-cert-app","client_certificate_file":"%s"}' "$TENANT" "$FIXTURES/platform-sp.pem")
check "configure with client_certificate_file" "$(q -c "SELECT byok.configure_tenant('$(config az_cert "$(block platform-cmk "$CERT_AUTH")")')")" "az_cert"
check "round trip" "$(q -c "SELECT byok.decrypt_text(byok.encrypt_text('az_cert', 'by certificate'))")" "by certificate"

echo "== a token from a file"
akv token | secret_file "$FIXTURES/access.token"
TOKEN_AUTH=$(printf '{"method":"token_file","token_file":"%s"}' "$FIXTURES/access.token")
check "configure with token_file" "$(q -c "SELECT byok.configure_tenant('$(config az_token "$(block platform-cmk "$TOKEN_AUTH")")')")" "az_token"
check "round trip" "$(q -c "SELECT byok.decrypt_text(byok.encrypt_text('az_token', 'by token file'))")" "by token file"

echo "== managed identity (App Service's token endpoint: IDENTITY_ENDPOINT, IDENTITY_HEADER)"
msi_count() { akv_hook stats | field ".get('msi 200', 0)"; }
MI_AUTH='{"method":"managed_identity"}'
check "configure with the system-assigned identity" "$(q -c "SELECT byok.configure_tenant('$(config az_mi "$(block platform-cmk "$MI_AUTH")")')")" "az_mi"
check "round trip" "$(q -c "SELECT byok.decrypt_text(byok.encrypt_text('az_mi', 'by managed identity'))")" "by managed identity"
issued=$(msi_count)
q -c "SELECT byok.flush_cache()" >/dev/null
check "the token is cached: another unwrap, no new token" "$(q -c "SELECT byok.decrypt_text(byok.encrypt_text('az_mi', 'again'))")/$(msi_count)" "again/$issued"
# A user-assigned identity, with tokens that live 302 s: the SDK refreshes a
# token once it is within 300 s of its expiry, before it expires.
akv_hook msi 302 false >/dev/null
MI_USER='{"method":"managed_identity","client_id":"platform-mi-user"}'
check "configure with a user-assigned identity" "$(q -c "SELECT byok.configure_tenant('$(config az_mi_user "$(block platform-cmk "$MI_USER")")')")" "az_mi_user"
issued=$(msi_count)
sleep 3
q -c "SELECT byok.flush_cache()" >/dev/null
check "a token near its expiry is refreshed before it expires" "$(q -c "SELECT byok.decrypt_text(byok.encrypt_text('az_mi_user', 'refreshed'))")/$(msi_count)" "refreshed/$((issued + 1))"
akv_hook msi 3599 true >/dev/null
MI_DOWN='{"method":"managed_identity","client_id":"platform-app"}'
expect_error "the token endpoint down: a clear outage" 58000 "token request" \
    "SELECT byok.configure_tenant('$(config az_mi_down "$(block platform-cmk "$MI_DOWN")")')"
akv_hook msi 3599 false >/dev/null
check "and back" "$(q -c "SELECT byok.configure_tenant('$(config az_mi_down "$(block platform-cmk "$MI_DOWN")")')")" "az_mi_down"

echo "== Managed HSM AES key (A256KW)"
check "configure on an oct-HSM key" "$(q -c "SELECT byok.configure_tenant('$(config az_hsm "$(block hsm-aes "$(sp platform-app platform)")")')")" "az_hsm"
q -c "CREATE TABLE azh AS SELECT g AS id, byok.encrypt_text('az_hsm', 'hsm ' || g) AS v FROM generate_series(1, 20) g" >/dev/null
q -c "SELECT byok.flush_cache()" >/dev/null
check "round trip through A256KW" "$(q -c "SELECT count(*) FROM azh WHERE byok.decrypt_text(v) = 'hsm ' || id")" "20"
check "the blob records A256KW (algorithm byte 2)" "$(q -c "SELECT get_byte(wrapped_dek, 0) FROM byok.wrapped_data_keys WHERE tenant_id = 'az_hsm'")" "2"

echo "== a wrapped key moved to another tenant does not open"
# Both tenants use the same key, so only the binding inside the wrapped value tells them apart.
q -c "UPDATE byok.wrapped_data_keys SET wrapped_dek = (SELECT wrapped_dek FROM byok.wrapped_data_keys WHERE tenant_id = 'az_sp') WHERE tenant_id = 'az_cert'" >/dev/null
q -c "SELECT byok.flush_cache()" >/dev/null
expect_error "az_sp's wrapped key stored as az_cert's" 39000 "wrapped for another tenant" \
    "SELECT byok.decrypt_text(byok.encrypt_text('az_cert', 'y'))"

echo "== rotation: a new key version, then every data key rewrapped to it"
V2=$(akv rotate platform-cmk | field "['key']['kid'].rsplit('/',1)[1]")
[ -n "$V2" ] && [ "$V2" != "$V1" ] && ok "Key Vault made version 2" || not_ok "rotate: '$V2'"
q -c "CALL byok.rotate_master_key('az_sp', 'platform-cmk')" 2>/dev/null
check "az_sp's data key now at the new version" "$(q -c "SELECT string_agg(DISTINCT cmk_version, ',') FROM byok.data_keys WHERE tenant_id = 'az_sp'")" "$V2"
akv set-enabled platform-cmk "$V1" false >/dev/null
q -c "SELECT byok.flush_cache()" >/dev/null
check "with version 1 disabled, the rewrapped values still decrypt" "$(q -c "SELECT count(*) FROM az WHERE byok.decrypt_text(v, 'az') = 'secret ' || id")" "100"

echo "== a disabled key version"
expect_error "az_token's key is still at the disabled version 1" 55000 "not allowed on a disabled key" \
    "SELECT byok.decrypt_text(byok.encrypt_text('az_token', 'z'))"
akv set-enabled platform-cmk "$V1" true >/dev/null
q -c "CALL byok.rotate_master_key('az_token', 'platform-cmk')" 2>/dev/null
akv set-enabled platform-cmk "$V1" false >/dev/null
q -c "SELECT byok.flush_cache()" >/dev/null
check "after rewrap, az_token works with version 1 disabled" "$(q -c "SELECT byok.decrypt_text(byok.encrypt_text('az_token', 'again'))")" "again"

echo "== errors"
expect_error "wrong client secret" 42501 "AADSTS7000215" \
    "SELECT byok.configure_tenant('$(config az_wrong "$(block platform-cmk "$(sp platform-app wrong)")")')"
expect_error "unknown key" 42704 "KeyNotFound" \
    "SELECT byok.configure_tenant('$(config az_missing "$(block no-such-key "$(sp platform-app platform)")")')"
expect_error "a key without wrapKey/unwrapKey is refused" 42501 "does not allow wrapKey and unwrapKey" \
    "SELECT byok.configure_tenant('$(config az_sign "$(block sign-only "$(sp platform-app platform)")")')"
expect_error "missing wrapKey permission" 42501 "does not have keys wrapKey permission" \
    "SELECT byok.configure_tenant('$(config az_reader "$(block platform-cmk "$(sp reader-app reader)")")'); SELECT byok.encrypt_text('az_reader', 'x')"
expect_error "an untrusted certificate is refused" 58000 "UnknownIssuer" \
    "SELECT byok.configure_tenant('$(config az_notrust "{\"vault_url\":\"$URL\",\"key_name\":\"platform-cmk\",\"authority_host\":\"$URL\",\"verify_challenge_resource\":false,\"auth\":$(sp platform-app platform)}")')"
expect_error "the challenge check stays on unless turned off" F0000 "verify_challenge_resource" \
    "SELECT byok.configure_tenant('$(config az_chk "{\"vault_url\":\"$URL\",\"key_name\":\"platform-cmk\",\"authority_host\":\"$URL\",\"ca_cert_file\":\"$FIXTURES/ca.pem\",\"auth\":$(sp platform-app platform)}")')"
expect_error "an inline secret is refused" F0000 "client_secret" \
    "SELECT byok.configure_tenant('$(config az_inline "{\"vault_url\":\"$URL\",\"key_name\":\"k\",\"auth\":{\"method\":\"service_principal\",\"tenant_id\":\"t\",\"client_id\":\"c\",\"client_secret\":\"inline\"}}")')"
expect_error "Key Vault unreachable" 58000 "could not be reached" \
    "SELECT byok.configure_tenant('$(config az_down "{\"vault_url\":\"https://127.0.0.1:1\",\"key_name\":\"platform-cmk\",\"authority_host\":\"$URL\",\"ca_cert_file\":\"$FIXTURES/ca.pem\",\"verify_challenge_resource\":false,\"auth\":$(sp platform-app platform)}")')"

echo "== throttling: 429 with Retry-After is retried within byok.kms_timeout_ms"
akv_hook stats > "$FIXTURES/stats-before.json"
akv_hook throttle 2 1 >/dev/null
q -c "SELECT byok.flush_cache()" >/dev/null
started=$(date +%s.%N)
check "two 429s (Retry-After: 1), then the answer" "$(q -c "SELECT byok.decrypt_text(v, 'az') FROM az WHERE id = 9")" "secret 9"
waited=$("$PY" -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]) >= 2)" "$started" "$(date +%s.%N)")
check "the broker waited as asked (at least 2 s)" "$waited" "True"
check "the stand-in answered 429 twice" "$(akv_hook stats | field "['unwrapKey 429']")" "2"
akv_hook throttle 1 30 >/dev/null
q -c "SELECT byok.flush_cache()" >/dev/null
expect_error "Retry-After beyond the timeout fails at once, clearly" 58000 "throttled" \
    "SELECT byok.decrypt_text(v, 'az') FROM az WHERE id = 9"


# Revocation drill (tests/testlib.sh): the customer disables the key version
# our data key is wrapped with, then enables it again.
DV1=$(akv create-key drill-cmk RSA-HSM 2048 wrapKey unwrapKey | field "['key']['kid'].rsplit('/',1)[1]")
q -c "SELECT byok.configure_tenant('$(printf '{"customer":"acme_corp","tenant_id":"az_drill","encryption":{"provider":"azure_kv","azure_kv":%s,"cache_config":{"ttl_seconds":86400,"revocation_check_seconds":2}}}' "$(block drill-cmk "$(sp platform-app platform)")")')" >/dev/null
disable_version() { akv set-enabled drill-cmk "$DV1" false >/dev/null; }
enable_version() { akv set-enabled drill-cmk "$DV1" true >/dev/null; }
stop_standin() { kill -STOP $STANDIN_PID; }
continue_standin() { kill -CONT $STANDIN_PID; }
revocation_drill "azure_kv: the key version disabled" az_drill 2 55000 "not allowed on a disabled key" \
    disable_version enable_version stop_standin continue_standin

echo "== no secret, certificate key or token in any message or log"
leaked=0
for s in "$(secret platform)" "$(secret reader)" "$(secret wrong)" "$(tr -d '\n' < "$FIXTURES/access.token")" \
         "$(grep -v -- '-----' "$FIXTURES/platform-sp.pem" | tail -n 3 | head -n 1)"; do
    grep -qF -- "$s" "$FIXTURES/errors.log" "$BYOK_WORK/$NAME/server.log" && leaked=1
done
[ $leaked = 0 ] && ok "no credential in errors or the server log" || not_ok "a credential leaked into a message or the log"
backup_drill b_azure azure_kv "$(block platform-cmk "$(sp platform-app platform)")"
exit $fail
