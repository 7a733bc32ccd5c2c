-- What the update must keep, one line per table (count and digest of the rows in
-- order), readable on 0.1.0 and on later versions: columns that exist in both,
-- audit rows without their hashes (the update re-chains them) and only up to
-- :audit_max (the update appends its own row), every sealed value byte for byte.
SELECT 'tenants ' || count(*) || ' ' || md5(string_agg(concat_ws(',', tenant_id, customer, provider, master_key_id,
       provider_options, rotation_enabled, rotation_interval_days, cache_ttl_seconds, cache_max_entries,
       cache_grace_period_seconds, audit_log_all_operations, audit_alert_on_failures, previous_master_key_id,
       previous_master_key_retires_at, config, created_at, updated_at), '|' ORDER BY tenant_id)) FROM byok.tenant_config t;
SELECT 'data keys ' || count(*) || ' ' || md5(string_agg(concat_ws(',', dek_id, tenant_id, md5(wrapped_dek), provider, cmk_id,
       cmk_version, state, created_at, rotated_at, destroyed_at), '|' ORDER BY dek_id)) FROM byok.wrapped_data_keys;
SELECT 'grants ' || count(*) || ' ' || md5(string_agg(g::text, '|' ORDER BY grantee::text, tenant_id)) FROM byok.tenant_grants g;
SELECT 'jobs ' || count(*) || ' ' || md5(string_agg(concat_ws(',', job_id, tenant_id, relid, state, rows_total, rows_done,
       batches, cursor_relid, cursor_column, cursor_ctid, sweeping, scan_done, keys_retired, last_error, created_at,
       started_at, run_started_at, run_rows_start, created_xact, updated_at, finished_at), '|' ORDER BY job_id))
  FROM byok.reencrypt_jobs;
SELECT 'requests ' || count(*) || ' ' || md5(string_agg(r::text, '|' ORDER BY request_id)) FROM byok.operation_requests r;
SELECT 'registry ' || count(*) || ' ' || md5(string_agg(concat_ws(',', relid, column_name, tenant_column, context, registered_at),
       '|' ORDER BY relid::oid, column_name)) FROM byok.protected_column_registry;
SELECT 'audit rows ' || count(*) || ' ' || md5(string_agg(concat_ws(',', id, logged_at, event, tenant_id, dek_id, role_name,
       outcome, reason, details), '|' ORDER BY id)) FROM byok.audit_log WHERE id <= :audit_max;
SELECT 'sequences ' || concat_ws(',', (SELECT last_value FROM byok.data_key_id_seq), (SELECT last_value FROM byok.reencrypt_jobs_job_id_seq),
       (SELECT last_value FROM byok.operation_requests_request_id_seq));
SELECT 'sealed values ' || count(*) || ' ' || md5(string_agg(ssn::text || note::text, '|' ORDER BY id)) FROM people;
