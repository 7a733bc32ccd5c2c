#!/usr/bin/env bash
# The aws_kms provider end to end, through the extension and the key broker,
# against moto (a KMS/STS/IAM emulator): a relaxed server that accepts any
# credentials, and a strict one that checks IAM (INITIAL_NO_AUTH_ACTION_COUNT).
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
set +e   # every outcome is checked below
PORT=54343
RELAXED=45660
STRICT=45661
NAME=aws
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
q() { psql_at $NAME $PORT -d postgres -qAt "$@"; }
http_get() { "$PY" -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())" "$1"; }

FIXTURES="$BYOK_WORK/aws-fixtures"
rm -rf "$FIXTURES"; mkdir -p "$FIXTURES"; chown postgres "$FIXTURES" 2>/dev/null || true
: > "$FIXTURES/errors.log"
"$BYOK_VENV/bin/moto_server" -H 127.0.0.1 -p $RELAXED > "$FIXTURES/moto-relaxed.log" 2>&1 &
MOTO_RELAXED=$!
INITIAL_NO_AUTH_ACTION_COUNT=10 "$BYOK_VENV/bin/moto_server" -H 127.0.0.1 -p $STRICT > "$FIXTURES/moto-strict.log" 2>&1 &
MOTO_STRICT=$!
trap 'kill $MOTO_RELAXED $MOTO_STRICT 2>/dev/null; stop_cluster $NAME' EXIT
for port in $RELAXED $STRICT; do
    for _ in $(seq 1 100); do http_get "http://127.0.0.1:$port/moto-api/data.json" >/dev/null 2>&1 && break; sleep 0.1; done
done
setup=$("$PY" "$(dirname "$0")/aws_setup.py" "http://127.0.0.1:$RELAXED" "http://127.0.0.1:$STRICT")
get() { "$PY" -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$setup" "$1"; }
PRIMARY=$(get primary_arn); SECOND=$(get second_arn); DISABLED=$(get disabled_arn); STRICT_KEY=$(get strict_arn)
STRICT_SECRET=$(get strict_secret_access_key)

# The broker's AWS credentials come from the server's environment and shared files;
# tenants pick a profile. Nothing secret goes through SQL.
creds="$FIXTURES/credentials"
as_postgres tee "$creds" >/dev/null <<INI
[default]
aws_access_key_id = test
aws_secret_access_key = test
[strict]
aws_access_key_id = $(get strict_access_key_id)
aws_secret_access_key = $STRICT_SECRET
[revocable]
aws_access_key_id = $(get revocable_access_key_id)
aws_secret_access_key = $(get revocable_secret_access_key)
[bogus]
aws_access_key_id = AKIAIOSFODNN7EXAMPLE
aws_secret_access_key = not-the-right-secret
INI
chmod 600 "$creds"; test -s "$creds" || { echo "NOT OK: credentials file not written"; exit 1; }
export AWS_SHARED_CREDENTIALS_FILE="$creds" AWS_CONFIG_FILE=/dev/null AWS_EC2_METADATA_DISABLED=true
# The server trusts the test fixtures with credentials, and the local
# emulators (plain http on 127.0.0.1) as endpoints: a production server
# allows neither (SECURITY.md).
start_cluster $NAME $PORT "byok.credential_directories = '$FIXTURES'" "byok.allowed_endpoints = '127.0.0.1'" "byok.allow_insecure_transport = on"
q -c "CREATE EXTENSION byok_pg" >/dev/null

config() { # config TENANT AWS_BLOCK_JSON
    printf '{"customer":"acme_corp","tenant_id":"%s","encryption":{"provider":"aws_kms","aws_kms":%s,"key_rotation":{"enabled":true,"interval_days":90},"cache_config":{"ttl_seconds":86400,"max_entries":1000},"audit":{"log_all_operations":true,"alert_on_failures":true}}}' "$1" "$2"
}
EP="http://127.0.0.1:$RELAXED"

echo "== a tenant configured from the guide's document, with an assumed role and external id"
check "configure_tenant" "$(q -c "SELECT byok.configure_tenant('$(config tenant_12345 "{\"key_arn\":\"$PRIMARY\",\"role_arn\":\"arn:aws:iam::123456789012:role/byok-access\",\"external_id\":\"unique-external-id-12345\",\"endpoint_url\":\"$EP\"}")')")" "tenant_12345"
assumed=$(http_get "$EP/moto-api/data.json" | "$PY" -c "
import json, sys
roles = json.load(sys.stdin)['sts']['AssumedRole']
print(sum(1 for r in roles if r['role_arn'].endswith('role/byok-access') and r['external_id'] == 'unique-external-id-12345' and r['session_name'] == 'byok_pg'))")
[ "${assumed:-0}" -ge 1 ] && ok "the broker assumed the role through STS with the external id" || not_ok "no AssumeRole with the external id seen by STS"
check "the data key is wrapped by KMS (cmk version = key ARN)" "$(q -c "SELECT provider, cmk_version = '$PRIMARY', state FROM byok.data_keys WHERE tenant_id = 'tenant_12345'")" "aws_kms|t|active"

echo "== values round-trip"
q >/dev/null <<'SQL'
CREATE TABLE accounts AS
SELECT g AS id, byok.encrypt_text('tenant_12345', 'iban-' || g, 'accounts.iban') AS iban FROM generate_series(1, 200) g;
SQL
check "200 values decrypt" "$(q -c "SELECT count(*) FROM accounts WHERE byok.decrypt_text(iban, 'accounts.iban') = 'iban-' || id")" "200"
check "one KMS Decrypt for all of them" "$(q -c "SELECT kms_calls - dek_generations + 1 >= 1, l1_hits >= 199 FROM byok.metrics WHERE tenant_id = 'tenant_12345'")" "t|t"

echo "== a key named by alias"
check "configure with alias/..." "$(q -c "SELECT byok.configure_tenant('$(config tenant_b "{\"key_arn\":\"alias/byok-tenant-b\",\"region\":\"us-east-1\",\"endpoint_url\":\"$EP\"}")')")" "tenant_b"
check "round trip under the alias" "$(q -c "SELECT byok.decrypt_text(byok.encrypt_text('tenant_b', 'hello'))")" "hello"

echo "== master-key rotation with ReEncrypt"
q -c "SELECT byok.rotate_data_key('tenant_12345')" >/dev/null
q -c "CALL byok.rotate_master_key('tenant_12345', '$SECOND', '1 hour')" 2>/dev/null
check "every data key now under the new key ARN" "$(q -c "SELECT count(*) FILTER (WHERE cmk_id = '$SECOND' AND cmk_version = '$SECOND'), count(*) FROM byok.data_keys WHERE tenant_id = 'tenant_12345'")" "2|2"
q -c "SELECT byok.flush_cache()" >/dev/null
check "all values still decrypt (through KMS, with the new wrapping)" "$(q -c "SELECT count(*) FROM accounts WHERE byok.decrypt_text(iban, 'accounts.iban') = 'iban-' || id")" "200"
check "the tenant records the rotation" "$(q -c "SELECT master_key_id = '$SECOND', previous_master_key_id = '$PRIMARY' FROM byok.tenants WHERE tenant_id = 'tenant_12345'")" "t|t"

echo "== replica fallback when the primary endpoint is down"
# moto cannot decrypt with multi-Region (mrk-) keys: its ciphertext format truncates their
# ids. So the "replica" here is the same key behind a second endpoint while the primary
# endpoint is unreachable; with real KMS it is the MRK's replica in another Region.
check "configure with a dead primary and a replica" "$(q -c "SELECT byok.configure_tenant('$(config dr_tenant "{\"key_arn\":\"$PRIMARY\",\"endpoint_url\":\"http://127.0.0.1:1\",\"replica_key_arns\":[\"$PRIMARY\"],\"replica_endpoint_urls\":{\"us-east-1\":\"$EP\"}}")')")" "dr_tenant"
check "round trip served by the replica" "$(q -c "SELECT byok.decrypt_text(byok.encrypt_text('dr_tenant', 'still here'))")" "still here"
check "metrics record that the replica served" "$(q -c "SELECT served_by_replica >= 1 FROM byok.metrics WHERE tenant_id = 'dr_tenant'")" "t"

echo "== errors"
expect_error "unknown key" 42704 "AWS error code NotFoundException from DescribeKey" \
    "SELECT byok.configure_tenant('$(config t_unknown "{\"key_arn\":\"arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000\",\"endpoint_url\":\"$EP\"}")')"
expect_error "disabled key (moto records DisableKey; DescribeKey shows it)" 55000 "is disabled" \
    "SELECT byok.configure_tenant('$(config t_disabled "{\"key_arn\":\"$DISABLED\",\"endpoint_url\":\"$EP\"}")')"
# Real KMS also refuses GenerateDataKey/Decrypt on a disabled key (DisabledException,
# mapped to 55000 the same way); moto does not enforce that, so only validation is shown.
q -c "CREATE TABLE b_vals AS SELECT byok.encrypt_text('tenant_b', 'bound to tenant_b') AS v" >/dev/null
q >/dev/null <<'SQL'
-- A wrapped data key moved to another tenant: KMS refuses its encryption context.
UPDATE byok.wrapped_data_keys SET wrapped_dek = (SELECT wrapped_dek FROM byok.wrapped_data_keys WHERE tenant_id = 'tenant_12345' AND state = 'active')
 WHERE tenant_id = 'tenant_b' AND state = 'active';
SELECT byok.flush_cache();
SQL
expect_error "wrong encryption context" 39000 "AWS error code InvalidCiphertextException from Decrypt" "SELECT byok.decrypt_text(v) FROM b_vals"
expect_error "unreachable KMS" 58000 "could not be reached" \
    "SELECT byok.configure_tenant('$(config t_down "{\"key_arn\":\"$PRIMARY\",\"endpoint_url\":\"http://127.0.0.1:1\"}")')"

echo "== IAM: a deny on kms:Decrypt, and wrong credentials (strict moto)"
SEP="http://127.0.0.1:$STRICT"
check "configure with the strict profile (DescribeKey and GenerateDataKey are allowed)" \
    "$(q -c "SELECT byok.configure_tenant('$(config t_strict "{\"key_arn\":\"$STRICT_KEY\",\"endpoint_url\":\"$SEP\",\"profile\":\"strict\"}")')")" "t_strict"
expect_error "Decrypt denied by IAM" 42501 "AWS error code AccessDeniedException from Decrypt" "SELECT byok.encrypt_text('t_strict', 'x')"
expect_error "wrong credentials" 42501 "AWS error code" \
    "SELECT byok.configure_tenant('$(config t_bogus "{\"key_arn\":\"$STRICT_KEY\",\"endpoint_url\":\"$SEP\",\"profile\":\"bogus\"}")')"

# Revocation drills (tests/testlib.sh): the customer disables its key, or
# withdraws our permission to decrypt; then undoes it.
DRILL_KEY=$(get drill_arn)
aws_call() { # aws_call ENDPOINT ACCESS_KEY SECRET SERVICE METHOD JSON_ARGS
    "$PY" -c "import boto3, json, sys
c = boto3.client(sys.argv[4], endpoint_url=sys.argv[1], aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3], region_name='us-east-1')
getattr(c, sys.argv[5])(**json.loads(sys.argv[6]))" "$@"
}
disable_drill_key() { aws_call "$EP" test test kms disable_key "{\"KeyId\": \"${DRILL_KEY##*/}\"}"; }
enable_drill_key() { aws_call "$EP" test test kms enable_key "{\"KeyId\": \"${DRILL_KEY##*/}\"}"; }
stop_moto() { kill -STOP $MOTO_RELAXED; }
continue_moto() { kill -CONT $MOTO_RELAXED; }
DENY_DECRYPT='{"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Action": "kms:Decrypt", "Resource": "*"}]}'
deny_decrypt() {
    aws_call "$SEP" "$(get admin_access_key_id)" "$(get admin_secret_access_key)" iam put_user_policy \
        "$("$PY" -c "import json, sys; print(json.dumps({'UserName': 'byok-revocable', 'PolicyName': 'customer-revoked', 'PolicyDocument': sys.argv[1]}))" "$DENY_DECRYPT")"
}
allow_decrypt() {
    aws_call "$SEP" "$(get admin_access_key_id)" "$(get admin_secret_access_key)" iam delete_user_policy \
        '{"UserName": "byok-revocable", "PolicyName": "customer-revoked"}'
}
drill_config() { # drill_config TENANT AWS_BLOCK_JSON
    printf '{"customer":"acme_corp","tenant_id":"%s","encryption":{"provider":"aws_kms","aws_kms":%s,"cache_config":{"ttl_seconds":86400,"revocation_check_seconds":2}}}' "$1" "$2"
}
q -c "SELECT byok.configure_tenant('$(drill_config t_disable "{\"key_arn\":\"$DRILL_KEY\",\"endpoint_url\":\"$EP\"}")')" >/dev/null
q -c "SELECT byok.configure_tenant('$(drill_config t_iam "{\"key_arn\":\"$STRICT_KEY\",\"endpoint_url\":\"$SEP\",\"profile\":\"revocable\"}")')" >/dev/null
revocation_drill "aws_kms: DisableKey (seen by DescribeKey)" t_disable 2 55000 "is not enabled" \
    disable_drill_key enable_drill_key stop_moto continue_moto
revocation_drill "aws_kms: IAM deny on kms:Decrypt" t_iam 2 42501 "AccessDeniedException" deny_decrypt allow_decrypt

echo "== the audit trail: each KMS call with its AWS request id, failures with their reason"
wait_for_audit_queue || not_ok "the audit queue did not drain"
check "GenerateDataKey and Decrypt calls recorded with AWS request ids" \
    "$(q -c "SELECT count(*) FILTER (WHERE event = 'kms_generate') >= 1, count(*) FILTER (WHERE event = 'kms_unwrap') >= 1, bool_and(coalesce(details->>'request_id', '') <> '') FROM byok.audit_log WHERE tenant_id = 'tenant_12345' AND event IN ('kms_generate', 'kms_unwrap')")" "t|t|t"
check "the IAM-denied Decrypt recorded as a failed kms_unwrap, with its request id" \
    "$(q -c "SELECT count(*) >= 1, bool_and(reason LIKE '%AccessDeniedException%'), bool_and(details ? 'request_id') FROM byok.audit_log WHERE tenant_id = 't_strict' AND event = 'kms_unwrap' AND outcome = 'failed'")" "t|t|t"

echo "== no secret in any message or log"
q -c "SELECT reason, details FROM byok.audit_log" >> "$FIXTURES/errors.log"
grep -q -- "$STRICT_SECRET\|not-the-right-secret" "$FIXTURES/errors.log" "$BYOK_WORK/$NAME/server.log" \
    && not_ok "a secret access key appears in an error or the server log" || ok "no secret access key in errors or the server log"
backup_drill b_aws aws_kms "{\"key_arn\":\"$PRIMARY\",\"endpoint_url\":\"$EP\"}"
exit $fail
