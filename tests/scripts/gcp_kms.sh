#!/usr/bin/env bash
# The gcp_kms provider end to end, through the extension and the key broker,
# against the Cloud KMS stand-in (tests/standins/gcp_kms: JWT bearer grant,
# IAM permissions, real AES-256-GCM with versions, CRC32C, RESOURCE_EXHAUSTED on
# demand, the metadata server's token endpoint), and one round trip against drongo
# (a second opinion on the REST shapes).
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
set +e   # every outcome is checked below
PORT=54346
KMS_PORT=18340
DRONGO_PORT=18350
NAME=gcp
STANDIN="$(cd "$(dirname "$0")/../standins/gcp_kms" && pwd)"
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
q() { psql_at $NAME $PORT -d postgres -qAt "$@"; }

FIXTURES="$BYOK_WORK/gcp-fixtures"
rm -rf "$FIXTURES"; mkdir -p "$FIXTURES"; chown postgres "$FIXTURES" 2>/dev/null
: > "$FIXTURES/errors.log"
URL="http://127.0.0.1:$KMS_PORT"
PROJECT=acme-byok
RING="projects/$PROJECT/locations/us-east1/keyRings/byok-keyring"
KEY="$RING/cryptoKeys/platform-cmk"
# Service accounts and their keys, as `gcloud iam service-accounts keys create` makes
# them: the platform may encrypt, decrypt and read keys (cryptoKeyEncrypterDecrypter
# + viewer); "viewer" only reads; "kms-admin" manages keys.
account() { "$PY" "$STANDIN/gkms.py" new-account "$FIXTURES" "$1@$PROJECT.iam.gserviceaccount.com" "${@:2}" --token-uri "$URL/token"; }
account byok-platform cloudkms.cryptoKeyVersions.useToEncrypt cloudkms.cryptoKeyVersions.useToDecrypt cloudkms.cryptoKeys.get
account viewer cloudkms.cryptoKeys.get
account kms-admin cloudkms.admin
keyfile() { echo "$FIXTURES/$1@$PROJECT.iam.gserviceaccount.com.json"; }
for sa in byok-platform viewer; do chown postgres "$(keyfile $sa)"; chmod 600 "$(keyfile $sa)"; done
# A key of an account the stand-in never registered (a deleted key, in effect).
"$PY" - "$(keyfile byok-platform)" "$FIXTURES/deleted-key.json" <<'PY'
import json, sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
key = json.load(open(sys.argv[1]))
key["private_key"] = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
json.dump(key, open(sys.argv[2], "w"))
PY
chown postgres "$FIXTURES/deleted-key.json"; chmod 600 "$FIXTURES/deleted-key.json"

# The metadata server, as a Compute Engine instance has it: found through
# GCE_METADATA_HOST in the server's environment; the instance runs as byok-platform.
export GCE_METADATA_HOST="127.0.0.1:$KMS_PORT"
"$PY" "$STANDIN/server.py" --port $KMS_PORT --accounts "$FIXTURES/accounts.json" --ready-file "$FIXTURES/ready" \
    --mds-account "byok-platform@$PROJECT.iam.gserviceaccount.com" 2> "$FIXTURES/standin.log" &
STANDIN_PID=$!
"$BYOK_VENV/bin/drongo" server --host 127.0.0.1 --port $DRONGO_PORT > "$FIXTURES/drongo.log" 2>&1 &
DRONGO_PID=$!
trap 'kill $STANDIN_PID $DRONGO_PID 2>/dev/null; stop_cluster $NAME' EXIT
for _ in $(seq 1 200); do [ -s "$FIXTURES/ready" ] && break; sleep 0.05; done
[ -s "$FIXTURES/ready" ] || { echo "NOT OK: the Cloud KMS stand-in did not start:"; tail -5 "$FIXTURES/standin.log"; exit 1; }
gkms() { "$PY" "$STANDIN/gkms.py" "$URL" "$(keyfile kms-admin)" "$@"; }
field() { "$PY" -c "import json,sys; d=json.load(sys.stdin); print(eval('d'+sys.argv[1]))" "$1"; }

# The guide's set-up: a key ring and a symmetric key; an HSM key; an EKM key.
gkms keyring "projects/$PROJECT/locations/us-east1" byok-keyring >/dev/null
gkms key "$RING" platform-cmk HSM >/dev/null
gkms key "$RING" ekm-cmk EXTERNAL >/dev/null

# The server trusts the test fixtures with credentials, and the local
# emulators (plain http on 127.0.0.1) as endpoints: a production server
# allows neither (SECURITY.md).
start_cluster $NAME $PORT "byok.credential_directories = '$FIXTURES'" "byok.allowed_endpoints = '127.0.0.1'" "byok.allow_insecure_transport = on"
q -c "CREATE EXTENSION byok_pg" >/dev/null
config() { # config TENANT GCP_BLOCK_JSON
    printf '{"customer":"acme_corp","tenant_id":"%s","encryption":{"provider":"gcp_kms","gcp_kms":%s,"key_rotation":{"enabled":true,"interval_days":90},"cache_config":{"ttl_seconds":86400,"max_entries":1000},"audit":{"log_all_operations":true,"alert_on_failures":true}}}' "$1" "$2"
}
block() { # block KEY KEYFILE [ENDPOINT]
    printf '{"key_name":"%s","endpoint":"%s","auth":{"method":"service_account_key","key_file":"%s"}}' "$1" "${3:-$URL}" "$2"
}

echo "== service-account key (JWT bearer grant), from the guide-shaped document"
check "configure_tenant" "$(q -c "SELECT byok.configure_tenant('$(config g_sa "$(block "$KEY" "$(keyfile byok-platform)")")')")" "g_sa"
q -c "CREATE TABLE g AS SELECT n AS id, byok.encrypt_text('g_sa', 'secret ' || n, 'g') AS v FROM generate_series(1, 100) n" >/dev/null
check "100 values round-trip" "$(q -c "SELECT count(*) FROM g WHERE byok.decrypt_text(v, 'g') = 'secret ' || id")" "100"
check "the data key records the version that encrypted it" "$(q -c "SELECT provider, cmk_id, cmk_version FROM byok.data_keys WHERE tenant_id = 'g_sa'")" "gcp_kms|$KEY|1"
q -c "SELECT byok.flush_cache()" >/dev/null
check "after a cache flush, decrypt through Cloud KMS" "$(q -c "SELECT byok.decrypt_text(v, 'g') FROM g WHERE id = 7")" "secret 7"

echo "== replica_endpoints: the endpoint cannot be reached, the same key through another answers"
check "configure with a dead endpoint and a replica" "$(q -c "SELECT byok.configure_tenant('$(config g_replica "{\"key_name\":\"$KEY\",\"endpoint\":\"http://127.0.0.1:1\",\"replica_endpoints\":[\"$URL\"],\"auth\":{\"method\":\"service_account_key\",\"key_file\":\"$(keyfile byok-platform)\"}}")')")" "g_replica"
q -c "SELECT byok.flush_cache()" >/dev/null
check "round trip through the replica" "$(q -c "SELECT byok.decrypt_text(byok.encrypt_text('g_replica', 'via the replica'))")" "via the replica"
check "served_by_replica counts it" "$(q -c "SELECT served_by_replica > 0 FROM byok.metrics WHERE tenant_id = 'g_replica'")" "t"

echo "== a token from a file; an EKM key through the same calls"
gkms token | (umask 077; cat > "$FIXTURES/access.token"); chown postgres "$FIXTURES/access.token"
check "configure with token_file on an EXTERNAL key" "$(q -c "SELECT byok.configure_tenant('$(config g_token "{\"key_name\":\"$RING/cryptoKeys/ekm-cmk\",\"endpoint\":\"$URL\",\"auth\":{\"method\":\"token_file\",\"token_file\":\"$FIXTURES/access.token\"}}")')")" "g_token"
check "round trip" "$(q -c "SELECT byok.decrypt_text(byok.encrypt_text('g_token', 'external'))")" "external"

echo "== the metadata server (GCE_METADATA_HOST): token issued, cached, refreshed before expiry, down"
mds_count() { gkms stats | field ".get('mds 200', 0)"; }
mds_hook() { gkms raw POST /_standin/mds "$1" >/dev/null; }
MDS_AUTH='{"method":"metadata_server"}'
check "configure with the instance's service account" "$(q -c "SELECT byok.configure_tenant('$(config g_mds "{\"key_name\":\"$KEY\",\"endpoint\":\"$URL\",\"auth\":$MDS_AUTH}")')")" "g_mds"
check "round trip" "$(q -c "SELECT byok.decrypt_text(byok.encrypt_text('g_mds', 'by metadata server'))")" "by metadata server"
issued=$(mds_count)
q -c "SELECT byok.flush_cache()" >/dev/null
check "the token is cached: another decrypt, no new token" "$(q -c "SELECT byok.decrypt_text(byok.encrypt_text('g_mds', 'again'))")/$(mds_count)" "again/$issued"
# Tokens that live 242 s: google-cloud-auth refreshes 240 s before expiry, in the background.
mds_hook '{"lifetime": 242}'
check "configure a second key's tenant (a new token, 242 s)" "$(q -c "SELECT byok.configure_tenant('$(config g_mds_short "{\"key_name\":\"$RING/cryptoKeys/ekm-cmk\",\"endpoint\":\"$URL\",\"auth\":$MDS_AUTH}")')")" "g_mds_short"
issued=$(mds_count)
sleep 4
check "refreshed before it expired, without a request waiting" "$(( $(mds_count) > issued ))" "1"
check "and used" "$(q -c "SELECT byok.decrypt_text(byok.encrypt_text('g_mds_short', 'refreshed'))")" "refreshed"
mds_hook '{"lifetime": 3599, "down": true}'
expect_error "the metadata server down: a clear outage" 58000 "access token" \
    "SELECT byok.configure_tenant('$(config g_mds_down "{\"key_name\":\"$KEY\",\"endpoint\":\"$URL/\",\"auth\":$MDS_AUTH}")')"
mds_hook '{"down": false}'

echo "== a wrapped key moved to another tenant does not open (its AAD names the tenant)"
q -c "SELECT byok.configure_tenant('$(config g_other "$(block "$KEY" "$(keyfile byok-platform)")")')" >/dev/null
q -c "SELECT byok.encrypt_text('g_other', 'x')" >/dev/null
q -c "UPDATE byok.wrapped_data_keys SET wrapped_dek = (SELECT wrapped_dek FROM byok.wrapped_data_keys WHERE tenant_id = 'g_sa') WHERE tenant_id = 'g_other'" >/dev/null
q -c "SELECT byok.flush_cache()" >/dev/null
expect_error "g_sa's wrapped key stored as g_other's" 39000 "Decryption failed: the ciphertext is invalid" \
    "SELECT byok.decrypt_text(byok.encrypt_text('g_other', 'y'))"

# g_old: a tenant whose data key stays under version 1 (not rotated below).
q -c "SELECT byok.configure_tenant('$(config g_old "$(block "$KEY" "$(keyfile byok-platform)")")')" >/dev/null
q -c "SELECT byok.encrypt_text('g_old', 'on version 1')" >/dev/null

echo "== rotation: a new primary version, then every data key re-encrypted under it"
gkms version "$KEY" >/dev/null
gkms primary "$KEY" 2 >/dev/null
q -c "CALL byok.rotate_master_key('g_sa', '$KEY')" 2>/dev/null
check "g_sa's data key now at version 2" "$(q -c "SELECT string_agg(DISTINCT cmk_version, ',') FROM byok.data_keys WHERE tenant_id = 'g_sa'")" "2"
gkms state "$KEY/cryptoKeyVersions/1" DISABLED >/dev/null
q -c "SELECT byok.flush_cache()" >/dev/null
check "with version 1 disabled, the re-encrypted values still decrypt" "$(q -c "SELECT count(*) FROM g WHERE byok.decrypt_text(v, 'g') = 'secret ' || id")" "100"

echo "== a disabled or destroyed version"
check "g_old's data key is still at version 1" "$(q -c "SELECT cmk_version FROM byok.data_keys WHERE tenant_id = 'g_old'")" "1"
expect_error "a data key still under disabled version 1" 55000 "is not enabled, current state is: DISABLED" \
    "SELECT byok.decrypt_text(byok.encrypt_text('g_old', 'z'))"
gkms destroy "$KEY/cryptoKeyVersions/1" >/dev/null
# (a refusal is remembered for a second or more, so the key manager is not asked
# on every row; flush_cache forgets it at once)
q -c "SELECT byok.flush_cache('g_old')" >/dev/null
expect_error "... and once version 1 is destroyed" 55000 "DESTROY_SCHEDULED" \
    "SELECT byok.decrypt_text(byok.encrypt_text('g_old', 'z'))"

echo "== errors"
expect_error "a deleted service-account key" 42501 "Invalid JWT Signature" \
    "SELECT byok.configure_tenant('$(config g_badkey "$(block "$KEY" "$FIXTURES/deleted-key.json")")')"
expect_error "unknown key" 42704 "not found" \
    "SELECT byok.configure_tenant('$(config g_missing "$(block "$RING/cryptoKeys/no-such-key" "$(keyfile byok-platform)")")')"
expect_error "missing encrypt permission" 42501 "cloudkms.cryptoKeyVersions.useToEncrypt' denied" \
    "SELECT byok.configure_tenant('$(config g_viewer "$(block "$KEY" "$(keyfile viewer)")")'); SELECT byok.encrypt_text('g_viewer', 'x')"
expect_error "a key name that is not a CryptoKey" F0000 "key_name" \
    "SELECT byok.configure_tenant('$(config g_name "$(block "$KEY/cryptoKeyVersions/2" "$(keyfile byok-platform)")")')"
expect_error "a private key given inline is refused" F0000 "private_key" \
    "SELECT byok.configure_tenant('$(config g_inline "{\"key_name\":\"$KEY\",\"auth\":{\"method\":\"service_account_key\",\"private_key\":\"x\"}}")')"
expect_error "Cloud KMS unreachable" 58000 "could not be reached" \
    "SELECT byok.configure_tenant('$(config g_down "$(block "$KEY" "$(keyfile byok-platform)" "http://127.0.0.1:1")")')"

echo "== RESOURCE_EXHAUSTED is retried with backoff; integrity failures too, never trusted"
gkms_hook() { "$PY" "$STANDIN/gkms.py" "$URL" - "$@"; }
gkms_hook exhaust 3 >/dev/null
q -c "SELECT byok.flush_cache()" >/dev/null
check "three 429s, then the answer" "$(q -c "SELECT byok.decrypt_text(v, 'g') FROM g WHERE id = 9")" "secret 9"
check "the stand-in answered RESOURCE_EXHAUSTED three times" "$(gkms_hook stats | field "['decrypt 429']")" "3"
gkms_hook corrupt 1 >/dev/null
q -c "SELECT byok.flush_cache()" >/dev/null
check "a damaged answer (CRC32C mismatch) is retried" "$(q -c "SELECT byok.decrypt_text(v, 'g') FROM g WHERE id = 10")" "secret 10"
gkms_hook corrupt 1000 >/dev/null
q -c "SELECT byok.flush_cache()" >/dev/null
expect_error "answers that stay damaged fail clearly" 58000 "CRC32C" \
    "SELECT byok.decrypt_text(v, 'g') FROM g WHERE id = 11"
gkms_hook corrupt 0 >/dev/null
gkms_hook exhaust 1000 >/dev/null
q -c "SELECT byok.flush_cache()" >/dev/null
expect_error "quota exhausted past the timeout" 58000 "RESOURCE_EXHAUSTED" \
    "SELECT byok.decrypt_text(v, 'g') FROM g WHERE id = 12"
gkms_hook exhaust 0 >/dev/null

echo "== drongo: a round trip against the other emulator"
for _ in $(seq 1 100); do grep -q listening "$FIXTURES/drongo.log" && break; sleep 0.1; done
D="http://127.0.0.1:$DRONGO_PORT"
drongo_call() { "$PY" "$STANDIN/gkms.py" "$D" - raw "$@" >/dev/null; }
drongo_call POST "/v1/projects/p/locations/global/keyRings?keyRingId=r" '{}'
drongo_call POST "/v1/projects/p/locations/global/keyRings/r/cryptoKeys?cryptoKeyId=k" '{"purpose": "ENCRYPT_DECRYPT"}'
echo "drongo-accepts-any-token" | (umask 077; cat > "$FIXTURES/drongo.token"); chown postgres "$FIXTURES/drongo.token"
check "configure against drongo" "$(q -c "SELECT byok.configure_tenant('$(config g_drongo "{\"key_name\":\"projects/p/locations/global/keyRings/r/cryptoKeys/k\",\"endpoint\":\"$D\",\"auth\":{\"method\":\"token_file\",\"token_file\":\"$FIXTURES/drongo.token\"}}")')")" "g_drongo"
q -c "CREATE TABLE gd AS SELECT byok.encrypt_text('g_drongo', 'via drongo') AS v" >/dev/null
q -c "SELECT byok.flush_cache()" >/dev/null
check "round trip through drongo" "$(q -c "SELECT byok.decrypt_text(v) FROM gd")" "via drongo"


# Revocation drill (tests/testlib.sh): the customer disables the key version
# our data key is encrypted with, then enables it again.
gkms key "$RING" drill-cmk HSM >/dev/null
q -c "SELECT byok.configure_tenant('$(printf '{"customer":"acme_corp","tenant_id":"g_drill","encryption":{"provider":"gcp_kms","gcp_kms":%s,"cache_config":{"ttl_seconds":86400,"revocation_check_seconds":2}}}' "$(block "$RING/cryptoKeys/drill-cmk" "$(keyfile byok-platform)")")')" >/dev/null
disable_version() { gkms state "$RING/cryptoKeys/drill-cmk/cryptoKeyVersions/1" DISABLED >/dev/null; }
enable_version() { gkms state "$RING/cryptoKeys/drill-cmk/cryptoKeyVersions/1" ENABLED >/dev/null; }
stop_standin() { kill -STOP $STANDIN_PID; }
continue_standin() { kill -CONT $STANDIN_PID; }
revocation_drill "gcp_kms: the key version disabled" g_drill 2 55000 "is not enabled" \
    disable_version enable_version stop_standin continue_standin

echo "== no private key or token in any message or log"
leaked=0
for s in "$(tr -d '\n' < "$FIXTURES/access.token")" \
         "$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['private_key'].splitlines()[5])" "$(keyfile byok-platform)")"; do
    grep -qF -- "$s" "$FIXTURES/errors.log" "$BYOK_WORK/$NAME/server.log" && leaked=1
done
[ $leaked = 0 ] && ok "no credential in errors or the server log" || not_ok "a credential leaked into a message or the log"
backup_drill b_gcp gcp_kms "$(block "$KEY" "$(keyfile byok-platform)")"
exit $fail
