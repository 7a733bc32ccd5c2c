-- Searchable encryption: blind index terms (see README, "Searchable encryption").
--
-- A searchable value carries, in its authenticated header, a term: HMAC-SHA-256
-- under its tenant's index key of the tenant, the context and the normalized
-- plaintext, truncated to the column's term length. byok.term() reads it
-- without any key, so an expression index can hold it; byok.search_terms()
-- computes the probes (once per query as an index condition) (under the active index key and, while a rotation's job
-- rewrites terms, the previous one); byok.matches() is both in one call, and
-- confirms each candidate by decrypting it, so a truncated term's false
-- positives never reach the result.

-- The probes and the confirming check: C functions reading their arguments
-- in place (the probe is computed once per query, the check once per candidate).
CREATE FUNCTION byok.search_term(tenant_id text, plaintext text, context text DEFAULT '')
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'byok_search_term' LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION byok.search_term(text, text, text) IS
    'The probe for a value under the tenant''s active index key: WHERE byok.term(col) = byok.search_term(...)';
CREATE FUNCTION byok.search_terms(tenant_id text, plaintext text, context text DEFAULT '')
    RETURNS bytea[]
    AS 'MODULE_PATHNAME', 'byok_search_terms' LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION byok.search_terms(text, text, text) IS
    'The probes for a value under every live index key of the tenant (two while an index-key rotation''s job runs)';
CREATE FUNCTION byok.confirm_match(value byok.encrypted, tenant_id text, plaintext text, context text DEFAULT '')
    RETURNS boolean
    AS 'MODULE_PATHNAME', 'byok_confirm_match' LANGUAGE C STABLE STRICT PARALLEL SAFE COST 1000;
COMMENT ON FUNCTION byok.confirm_match(byok.encrypted, text, text, text) IS
    'Whether a candidate found by its term is the tenant''s and decrypts to plaintext (after the column''s normalization)';

-- Sealing with a term: the same C function as the three-argument forms, which
-- reads the fourth argument when there is one.
CREATE FUNCTION byok.encrypt(tenant_id text, plaintext bytea, context text, searchable boolean)
    RETURNS byok.encrypted
    AS 'MODULE_PATHNAME', 'byok_encrypt' LANGUAGE C VOLATILE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION byok.encrypt(text, bytea, text, boolean) IS
    'Seals bytes for a tenant; with searchable => true the value also carries its blind index term (byok.term)';
CREATE FUNCTION byok.encrypt_text(tenant_id text, plaintext text, context text, searchable boolean)
    RETURNS byok.encrypted
    AS 'MODULE_PATHNAME', 'byok_encrypt' LANGUAGE C VOLATILE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION byok.encrypt_text(text, text, text, boolean) IS
    'Seals text for a tenant; with searchable => true the value also carries its blind index term (byok.term)';

-- Metadata of a sealed value, readable without any key: what an index holds.
CREATE FUNCTION byok.term(value byok.encrypted) RETURNS bytea
    AS 'MODULE_PATHNAME', 'byok_value_term' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION byok.term(byok.encrypted) IS
    'A searchable value''s blind index term, prefixed by its index key id (NULL for a value sealed without one): CREATE INDEX ON t (byok.term(col))';
CREATE FUNCTION byok.index_key_id(value byok.encrypted) RETURNS bigint
    AS 'MODULE_PATHNAME', 'byok_value_index_key_id' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION byok.index_key_id(byok.encrypted) IS
    'The id of the index key a searchable value''s term was computed under (NULL for a value without a term)';

-- The one-call lookup. A SQL function the planner inlines, so that
--   WHERE byok.matches(email, 'acme', 'alice@example.com', 'users.email')
-- becomes an index condition on byok.term(email) plus the confirming decrypt.
-- SECURITY INVOKER and without SET (either would stop the inlining): it runs
-- nothing but the schema-qualified functions below, with the caller's rights.
CREATE FUNCTION byok.matches(value byok.encrypted, tenant_id text, plaintext text, context text DEFAULT '')
    RETURNS boolean LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT byok.term($1) OPERATOR(pg_catalog.=) ANY (byok.search_terms($2, $3, $4))
             AND byok.confirm_match($1, $2, $3, $4) $$;
COMMENT ON FUNCTION byok.matches(byok.encrypted, text, text, text) IS
    'Whether a searchable value equals plaintext (after the column''s normalization), through an index on byok.term(value) when there is one';
