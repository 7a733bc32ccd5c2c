-- The key broker and its shared memory exist only when byok_pg is preloaded:
-- refuse to install otherwise, saying what to add to postgresql.conf.
CREATE FUNCTION byok.require_preload() RETURNS void
    AS 'MODULE_PATHNAME', 'byok_require_preload' LANGUAGE C;
SELECT byok.require_preload();
DROP FUNCTION byok.require_preload();

-- byok.encrypted: a sealed value (see crates/byok-core/src/envelope.rs for the layout).
-- Declared by hand because it has binary send/recv and is built in place by the
-- C functions below.
CREATE TYPE byok.encrypted;

CREATE FUNCTION byok.encrypted_in(cstring) RETURNS byok.encrypted
    AS 'MODULE_PATHNAME', 'byok_encrypted_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION byok.encrypted_out(byok.encrypted) RETURNS cstring
    AS 'MODULE_PATHNAME', 'byok_encrypted_out' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION byok.encrypted_recv(internal) RETURNS byok.encrypted
    AS 'MODULE_PATHNAME', 'byok_encrypted_recv' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION byok.encrypted_send(byok.encrypted) RETURNS bytea
    AS 'MODULE_PATHNAME', 'byok_encrypted_send' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE TYPE byok.encrypted (
    INPUT = byok.encrypted_in,
    OUTPUT = byok.encrypted_out,
    RECEIVE = byok.encrypted_recv,
    SEND = byok.encrypted_send,
    INTERNALLENGTH = VARIABLE,
    ALIGNMENT = int4,
    -- Ciphertext does not compress: store it out of line when large, never try to compress it.
    STORAGE = external
);
COMMENT ON TYPE byok.encrypted IS
    'A value sealed with AES-256-GCM under a tenant''s data key; text form "byok:" || base64';

-- Casts with bytea, for drivers in binary mode: the bytes are the type's
-- binary (send/recv) format, the envelope. bytea -> byok.encrypted checks the
-- envelope's structure like the type's inputs (22P02 on bytes that are not a
-- sealed value) and applies on assignment (a bytea parameter INSERTed or
-- UPDATEd into a byok.encrypted column) and when written (::byok.encrypted),
-- never implicitly inside expressions, so no function call silently takes
-- arbitrary bytes for a sealed value. byok.encrypted -> bytea is explicit and
-- free (the same bytes).
CREATE FUNCTION byok.encrypted_from_bytea(bytea) RETURNS byok.encrypted
    AS 'MODULE_PATHNAME', 'byok_encrypted_from_bytea' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE CAST (bytea AS byok.encrypted) WITH FUNCTION byok.encrypted_from_bytea(bytea) AS ASSIGNMENT;
CREATE CAST (byok.encrypted AS bytea) WITHOUT FUNCTION;

-- Per-row functions. encrypt() is VOLATILE because every call draws a fresh nonce;
-- decrypt() is STABLE because its result depends on key state and byok.tenant.
CREATE FUNCTION byok.encrypt(tenant_id text, plaintext bytea, context text DEFAULT '')
    RETURNS byok.encrypted
    AS 'MODULE_PATHNAME', 'byok_encrypt' LANGUAGE C VOLATILE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION byok.encrypt(text, bytea, text) IS
    'Seals plaintext under the tenant''s active data key, bound to the tenant and the optional context';

-- text and bytea share a representation, so encrypt_text is the same C function.
CREATE FUNCTION byok.encrypt_text(tenant_id text, plaintext text, context text DEFAULT '')
    RETURNS byok.encrypted
    AS 'MODULE_PATHNAME', 'byok_encrypt' LANGUAGE C VOLATILE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION byok.encrypt_text(text, text, text) IS
    'Seals text under the tenant''s active data key, bound to the tenant and the optional context';

CREATE FUNCTION byok.decrypt(value byok.encrypted, context text DEFAULT '')
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'byok_decrypt' LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION byok.decrypt(byok.encrypted, text) IS
    'Opens a sealed value; fails unless the value, its tenant and the context all match';

CREATE FUNCTION byok.decrypt_text(value byok.encrypted, context text DEFAULT '')
    RETURNS text
    AS 'MODULE_PATHNAME', 'byok_decrypt_text' LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION byok.decrypt_text(byok.encrypted, text) IS
    'Opens a sealed value as text in the database encoding';

-- Metadata of a sealed value, readable without any key.
CREATE FUNCTION byok.data_key_id(value byok.encrypted) RETURNS bigint
    AS 'MODULE_PATHNAME', 'byok_value_data_key_id' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION byok.data_key_id(byok.encrypted) IS
    'The id of the data key a value is sealed under (see byok.data_keys)';

-- Re-encryption (inside re-encryption jobs' statements, or for a superuser:
-- the function checks; its privileges are in privileges.sql).
CREATE FUNCTION byok.reencrypt(value byok.encrypted, context text DEFAULT '')
    RETURNS byok.encrypted
    AS 'MODULE_PATHNAME', 'byok_reencrypt' LANGUAGE C VOLATILE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION byok.reencrypt(byok.encrypted, text) IS
    'The same plaintext sealed under its tenant''s active data key, with the same context';

CREATE FUNCTION byok.value_opens(value byok.encrypted, context text DEFAULT '')
    RETURNS boolean
    AS 'MODULE_PATHNAME', 'byok_value_opens' LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION byok.value_opens(byok.encrypted, text) IS
    'Whether a value opens with the context, without raising an error (verification)';
