-- Roles and per-tenant grants. Who may call what is in privileges.sql.
--   byok_user:  encrypt and decrypt (the per-row functions) the tenants it is granted;
--   byok_admin: the above, plus administration: tenants, rotation, jobs, caches,
--               destruction, validation, the audit trail and the views.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'byok_admin') THEN
        CREATE ROLE byok_admin NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'byok_user') THEN
        CREATE ROLE byok_user NOLOGIN;
    END IF;
END
$roles$;

-- A role may encrypt for and decrypt a tenant's values only when it (or a role
-- it belongs to) is granted the tenant; superusers always may. The per-row
-- functions check it once per (role, data key) and cache the answer with the
-- key; a change here (or to role membership) drops every backend's ready keys
-- at commit, so a revoke takes effect at once.
CREATE TABLE byok.tenant_grants (
    grantee regrole NOT NULL,
    tenant_id text NOT NULL REFERENCES byok.tenant_config (tenant_id) ON DELETE CASCADE,
    granted_by name NOT NULL DEFAULT session_user,
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (grantee, tenant_id)
);
COMMENT ON TABLE byok.tenant_grants IS 'Which roles may encrypt and decrypt which tenants'' values (byok.grant_tenant)';
SELECT pg_catalog.pg_extension_config_dump('byok.tenant_grants', '');
CREATE TRIGGER invalidate_key_caches
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON byok.tenant_grants
    FOR EACH STATEMENT EXECUTE FUNCTION byok.invalidate_key_caches();

-- Whether role p_role may use tenant p_tenant's keys (superuser, or granted
-- directly or through membership). Internal: the extension calls it as its owner.
CREATE FUNCTION byok.may_use_tenant(p_role oid, p_tenant text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE oid OPERATOR(pg_catalog.=) p_role AND rolsuper)
        OR EXISTS (SELECT 1 FROM byok.tenant_grants g
                    WHERE g.tenant_id OPERATOR(pg_catalog.=) p_tenant
                      AND pg_catalog.pg_has_role(p_role, g.grantee::pg_catalog.oid, 'USAGE'))
$fn$;

CREATE VIEW byok.tenant_access WITH (security_invoker = true) AS
    SELECT grantee, tenant_id, granted_by, granted_at FROM byok.tenant_grants;
COMMENT ON VIEW byok.tenant_access IS 'Per-tenant grants (byok.grant_tenant): all of them for administrators, a role''s own for others';

-- Row-level security on the catalog: administrators see every tenant, other
-- roles the tenants they are granted, and of the grants only their own
-- (byok.tenant_visible answers for the current user only). The extension's own
-- functions read the tables as their owner, which row-level security does not
-- restrict.
ALTER TABLE byok.tenant_config ENABLE ROW LEVEL SECURITY;
ALTER TABLE byok.wrapped_data_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE byok.tenant_grants ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_visibility ON byok.tenant_config FOR SELECT
    USING (byok.tenant_visible(tenant_id));
CREATE POLICY tenant_visibility ON byok.wrapped_data_keys FOR SELECT
    USING (byok.tenant_visible(tenant_id));
CREATE POLICY own_grants ON byok.tenant_grants FOR SELECT
    USING (pg_catalog.pg_has_role('byok_admin', 'USAGE')
           OR pg_catalog.pg_has_role(grantee::pg_catalog.oid, 'USAGE'));
