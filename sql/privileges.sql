-- Every privilege byok_pg grants, in one place. Nothing is open to PUBLIC
-- beyond the schema, the type, and five per-row functions that decide for
-- themselves (data_key_id, term and index_key_id read no key; reencrypt and
-- value_opens act only for a re-encryption job's statement or a role granted
-- the value's tenant).
--   byok_user:  encrypt and decrypt the tenants it is granted (byok.grant_tenant);
--   byok_admin: administration. It runs as the extension's owner inside each
--               function, never through rights on the catalog tables themselves
--               (it may read them, minus wrapped keys, through the views).
-- Only superusers and the server's OS user are trusted: see SECURITY.md.

GRANT USAGE ON SCHEMA byok TO PUBLIC;

-- Functions: closed by default (including any added later), then opened one by one.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA byok FROM PUBLIC;
REVOKE EXECUTE ON ALL PROCEDURES IN SCHEMA byok FROM PUBLIC;
-- The type's input and output (used by COPY, pg_dump, drivers) and its cast from bytea.
GRANT EXECUTE ON FUNCTION byok.encrypted_in(cstring), byok.encrypted_out(byok.encrypted),
    byok.encrypted_recv(internal), byok.encrypted_send(byok.encrypted),
    byok.encrypted_from_bytea(bytea)
  TO PUBLIC;
-- byok.role_ref's input, output and comparisons (OIDs and names only).
GRANT EXECUTE ON FUNCTION byok.role_ref_in(cstring), byok.role_ref_out(byok.role_ref),
    byok.role_ref_eq(byok.role_ref, byok.role_ref), byok.role_ref_ne(byok.role_ref, byok.role_ref),
    byok.role_ref_lt(byok.role_ref, byok.role_ref), byok.role_ref_le(byok.role_ref, byok.role_ref),
    byok.role_ref_gt(byok.role_ref, byok.role_ref), byok.role_ref_ge(byok.role_ref, byok.role_ref),
    byok.role_ref_cmp(byok.role_ref, byok.role_ref), byok.role_ref_hash(byok.role_ref)
  TO PUBLIC;
-- Called inside re-encryption jobs' statements, which run as each table's owner.
GRANT EXECUTE ON FUNCTION byok.data_key_id(byok.encrypted), byok.reencrypt(byok.encrypted, text),
    byok.value_opens(byok.encrypted, text)
  TO PUBLIC;
-- A searchable value's term and index key id: bytes of the value, no key
-- (an index on byok.term(col) is built and used with the table owner's rights).
GRANT EXECUTE ON FUNCTION byok.term(byok.encrypted), byok.index_key_id(byok.encrypted) TO PUBLIC;

-- byok_user: the per-row functions, and what the catalog views need.
GRANT EXECUTE ON FUNCTION byok.encrypt(text, bytea, text), byok.encrypt_text(text, text, text),
    byok.decrypt(byok.encrypted, text), byok.decrypt_text(byok.encrypted, text),
    byok.tenant_visible(text),
    byok.encrypt(text, bytea, text, boolean), byok.encrypt_text(text, text, text, boolean),
    byok.search_term(text, text, text), byok.search_terms(text, text, text),
    byok.confirm_match(byok.encrypted, text, text, text), byok.matches(byok.encrypted, text, text, text)
  TO byok_user, byok_admin;
GRANT SELECT (tenant_id, customer, provider, master_key_id, previous_master_key_id,
              previous_master_key_retires_at, provider_options, rotation_enabled,
              rotation_interval_days, cache_ttl_seconds, cache_max_entries,
              cache_grace_period_seconds, audit_log_all_operations, audit_alert_on_failures,
              created_at, updated_at, backup_provider, backup_master_key_id,
              backup_provider_options, dr_active, dr_activated_at)
    ON byok.tenant_config TO byok_admin, byok_user;
GRANT SELECT (dek_id, tenant_id, provider, cmk_id, cmk_version, state, created_at, rotated_at,
              destroyed_at, encryptions, has_primary_wrap, backup_provider, backup_cmk_id,
              backup_cmk_version, has_backup_wrap, purpose)
    ON byok.wrapped_data_keys TO byok_admin, byok_user;
GRANT SELECT ON byok.tenant_grants TO byok_admin, byok_user;
GRANT SELECT ON byok.tenants, byok.data_keys, byok.tenant_access TO byok_admin, byok_user;

-- byok_admin: administration.
GRANT EXECUTE ON FUNCTION byok.configure_tenant(jsonb), byok.rotate_data_key(text),
    byok.set_data_key_state(bigint, text), byok.destroy_data_key(bigint, bigint),
    byok.destroy_tenant_keys(text, text), byok.flush_cache(text), byok.validate_tenant(text),
    byok.grant_tenant(text, text), byok.revoke_tenant(text, text),
    byok.request_operation(text, text, jsonb), byok.approve_operation(bigint),
    byok.cancel_operation(bigint), byok.segregation_policy(),
    byok.rotate_master_key_step(text, text, interval), byok.rotate_master_key_finish(text, text),
    byok.protect_column(regclass, text, text, text), byok.start_reencrypt(text, regclass),
    byok.pause_job(bigint), byok.resume_job(bigint), byok.cancel_job(bigint),
    byok.wait_job(bigint, interval), byok.data_key_references(bigint),
    byok.verify_audit_chain(bigint, bytea), byok.audit_chain_head(),
    byok.backend_cache_stats(), byok.broker_status(), byok.metrics_counters(),
    byok.key_status(), byok.schedule_master_key_rotation(jsonb),
    byok.cancel_scheduled_rotation(text, bigint), byok.retire_previous_master_key(text),
    byok.alert_states(), byok.prometheus_metrics(),
    byok.complete_key_wraps_step(text), byok.complete_key_wraps_finish(text),
    byok.activate_dr(text), byok.deactivate_dr(text),
    byok.citus_metrics(), byok.citus_audit_log(timestamptz), byok.crypto_info(),
    byok.start_compromise_response(text, text), byok.compromise_response_step(text, bigint),
    byok.rotate_index_key(text), byok.make_searchable(regclass, text, integer, text),
    byok.make_transparent(regclass, name, name)
  TO byok_admin;
-- SQL exporters (postgres_exporter and the like) run as members of pg_monitor.
GRANT EXECUTE ON FUNCTION byok.prometheus_metrics(), byok.crypto_info() TO pg_monitor;
GRANT EXECUTE ON PROCEDURE byok.rotate_master_key(text, text, interval),
    byok.complete_key_wraps(text), byok.respond_to_compromise(text, text)
  TO byok_admin;
GRANT SELECT ON byok.jobs, byok.protected_columns, byok.metrics, byok.tenant_key_status, byok.alerts, byok.audit_log,
    byok.pending_operations, byok.scheduled_rotations, byok.retired_master_keys,
    byok.compromise_responses
  TO byok_admin;
-- (No role but the owner writes the catalog tables: byok_admin's changes go
-- through the functions above, which check what they are asked to do.)
