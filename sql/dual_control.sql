-- Dual control (PCI DSS): in an environment whose segregation policy requires
-- approval (production), destroying, rotating and granting run only through a
-- request by one byok_admin and its approval by another, within
-- byok.approval_expiry_minutes. The operations and who may take part are
-- decided in Rust (src/admin/); this is the record of requests.
CREATE TABLE byok.operation_requests (
    request_id bigserial PRIMARY KEY,
    operation text NOT NULL,
    tenant_id text NOT NULL,
    args jsonb NOT NULL DEFAULT '{}',
    requested_by name NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'cancelled')),
    approved_by name,
    approved_at timestamptz,
    result text
);
COMMENT ON TABLE byok.operation_requests IS 'Operations awaiting (or given) a second administrator''s approval';
SELECT pg_catalog.pg_extension_config_dump('byok.operation_requests', '');
SELECT pg_catalog.pg_extension_config_dump('byok.operation_requests_request_id_seq', '');

CREATE VIEW byok.pending_operations AS
SELECT request_id, operation, tenant_id, args, requested_by, requested_at, expires_at,
       CASE WHEN state = 'pending' AND expires_at <= now() THEN 'expired' ELSE state END AS state,
       approved_by, approved_at, result
  FROM byok.operation_requests;
COMMENT ON VIEW byok.pending_operations IS 'Dual-control requests and their state (pending, done, cancelled, expired)';
