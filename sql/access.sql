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

-- byok.role_ref: a role, stored as its OID like regrole, written and read only
-- as the role's name. It has no binary send/receive on purpose: Citus copies a
-- reference table between nodes in binary when every column allows it, and a
-- role's OID differs from node to node (README, "Citus"). Its input refuses a
-- bare number (an OID from another node or of a dropped role).
CREATE TYPE byok.role_ref;
CREATE FUNCTION byok.role_ref_in(cstring) RETURNS byok.role_ref
    AS 'MODULE_PATHNAME', 'byok_role_ref_in' LANGUAGE C STRICT STABLE PARALLEL SAFE;
CREATE FUNCTION byok.role_ref_out(byok.role_ref) RETURNS cstring
    AS 'regroleout' LANGUAGE internal STRICT STABLE PARALLEL SAFE;
CREATE TYPE byok.role_ref (INPUT = byok.role_ref_in, OUTPUT = byok.role_ref_out, LIKE = pg_catalog.oid);
COMMENT ON TYPE byok.role_ref IS 'A role, stored as its OID, written and read as its name only (no binary form: Citus copies it between nodes as text)';
CREATE CAST (byok.role_ref AS pg_catalog.oid) WITHOUT FUNCTION;
CREATE CAST (pg_catalog.oid AS byok.role_ref) WITHOUT FUNCTION;
CREATE CAST (byok.role_ref AS pg_catalog.regrole) WITHOUT FUNCTION AS IMPLICIT;
CREATE CAST (pg_catalog.regrole AS byok.role_ref) WITHOUT FUNCTION AS ASSIGNMENT;
-- Comparison (OID order), for the grants' primary key.
CREATE FUNCTION byok.role_ref_eq(byok.role_ref, byok.role_ref) RETURNS boolean
    AS 'oideq' LANGUAGE internal IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION byok.role_ref_ne(byok.role_ref, byok.role_ref) RETURNS boolean
    AS 'oidne' LANGUAGE internal IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION byok.role_ref_lt(byok.role_ref, byok.role_ref) RETURNS boolean
    AS 'oidlt' LANGUAGE internal IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION byok.role_ref_le(byok.role_ref, byok.role_ref) RETURNS boolean
    AS 'oidle' LANGUAGE internal IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION byok.role_ref_gt(byok.role_ref, byok.role_ref) RETURNS boolean
    AS 'oidgt' LANGUAGE internal IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION byok.role_ref_ge(byok.role_ref, byok.role_ref) RETURNS boolean
    AS 'oidge' LANGUAGE internal IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION byok.role_ref_cmp(byok.role_ref, byok.role_ref) RETURNS integer
    AS 'btoidcmp' LANGUAGE internal IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION byok.role_ref_hash(byok.role_ref) RETURNS integer
    AS 'hashoid' LANGUAGE internal IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE OPERATOR byok.= (LEFTARG = byok.role_ref, RIGHTARG = byok.role_ref, FUNCTION = byok.role_ref_eq,
    COMMUTATOR = OPERATOR(byok.=), NEGATOR = OPERATOR(byok.<>), RESTRICT = eqsel, JOIN = eqjoinsel, HASHES, MERGES);
CREATE OPERATOR byok.<> (LEFTARG = byok.role_ref, RIGHTARG = byok.role_ref, FUNCTION = byok.role_ref_ne,
    COMMUTATOR = OPERATOR(byok.<>), NEGATOR = OPERATOR(byok.=), RESTRICT = neqsel, JOIN = neqjoinsel);
CREATE OPERATOR byok.< (LEFTARG = byok.role_ref, RIGHTARG = byok.role_ref, FUNCTION = byok.role_ref_lt,
    COMMUTATOR = OPERATOR(byok.>), NEGATOR = OPERATOR(byok.>=), RESTRICT = scalarltsel, JOIN = scalarltjoinsel);
CREATE OPERATOR byok.<= (LEFTARG = byok.role_ref, RIGHTARG = byok.role_ref, FUNCTION = byok.role_ref_le,
    COMMUTATOR = OPERATOR(byok.>=), NEGATOR = OPERATOR(byok.>), RESTRICT = scalarlesel, JOIN = scalarlejoinsel);
CREATE OPERATOR byok.> (LEFTARG = byok.role_ref, RIGHTARG = byok.role_ref, FUNCTION = byok.role_ref_gt,
    COMMUTATOR = OPERATOR(byok.<), NEGATOR = OPERATOR(byok.<=), RESTRICT = scalargtsel, JOIN = scalargtjoinsel);
CREATE OPERATOR byok.>= (LEFTARG = byok.role_ref, RIGHTARG = byok.role_ref, FUNCTION = byok.role_ref_ge,
    COMMUTATOR = OPERATOR(byok.<=), NEGATOR = OPERATOR(byok.<), RESTRICT = scalargesel, JOIN = scalargejoinsel);
CREATE OPERATOR CLASS byok.role_ref_ops DEFAULT FOR TYPE byok.role_ref USING btree AS
    OPERATOR 1 byok.<, OPERATOR 2 byok.<=, OPERATOR 3 byok.=, OPERATOR 4 byok.>=, OPERATOR 5 byok.>,
    FUNCTION 1 byok.role_ref_cmp(byok.role_ref, byok.role_ref);
CREATE OPERATOR CLASS byok.role_ref_hash_ops DEFAULT FOR TYPE byok.role_ref USING hash AS
    OPERATOR 1 byok.=, FUNCTION 1 byok.role_ref_hash(byok.role_ref);

-- A role may encrypt for and decrypt a tenant's values only when it (or a role
-- it belongs to) is granted the tenant; superusers always may. The per-row
-- functions check it once per (role, data key) and cache the answer with the
-- key; a change here (or to role membership) drops every backend's ready keys
-- at commit, so a revoke takes effect at once.
CREATE TABLE byok.tenant_grants (
    grantee byok.role_ref NOT NULL,
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
    SELECT grantee::pg_catalog.regrole AS grantee, tenant_id, granted_by, granted_at FROM byok.tenant_grants;
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
