\set VERBOSITY default
\set SHOW_CONTEXT never
-- Two AES-256-GCM implementations seal and open values: RustCrypto's aes-gcm
-- for short ones, aws-lc for long ones: from 384 bytes where aws-lc runs its
-- AVX-512 code, from 768 on other CPUs. They make the same bytes, so a value
-- sealed by either opens with either.
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;
SELECT byok.configure_tenant('{"customer": "GCM Co", "tenant_id": "gcmco",
  "encryption": {"provider": "local", "local": {"key_id": "gcmco-cmk"}}}') IS NOT NULL AS configured;
SHOW byok.aes_gcm_implementation;

-- Values on both sides of the switch, sealed under each implementation pinned.
CREATE TABLE gcm_values (sealed_by text, len int, plain bytea, sealed byok.encrypted);
CREATE FUNCTION gcm_seal_all(p_impl text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('byok.aes_gcm_implementation', p_impl, true);
    INSERT INTO gcm_values
    SELECT p_impl, len, p, byok.encrypt('gcmco', p, 'gcm_values.sealed')
      FROM (SELECT len, substring(decode(repeat(md5(len::text), len / 16 + 1), 'hex') FROM 1 FOR len) AS p
              FROM unnest(ARRAY[0, 1, 100, 383, 384, 767, 768, 1000, 4000, 70000]) len) s;
END $$;
SELECT gcm_seal_all('rustcrypto'), gcm_seal_all('aws-lc'), gcm_seal_all('auto');

-- Every value opens under every implementation, and as sealed.
CREATE FUNCTION gcm_open_all(p_impl text) RETURNS TABLE (opened_by text, sealed_by text, values_ok bigint) LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('byok.aes_gcm_implementation', p_impl, true);
    RETURN QUERY SELECT p_impl, v.sealed_by, count(*) FILTER (WHERE byok.decrypt(v.sealed, 'gcm_values.sealed') = v.plain)
      FROM gcm_values v GROUP BY v.sealed_by;
END $$;
SELECT * FROM gcm_open_all('rustcrypto') UNION ALL SELECT * FROM gcm_open_all('aws-lc')
 UNION ALL SELECT * FROM gcm_open_all('auto') ORDER BY 1, 2;

-- A modified value fails under both (the last byte: the tag).
CREATE FUNCTION gcm_tampered_fails(p_impl text, p_len int) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    raw bytea := byok.encrypted_send((SELECT sealed FROM gcm_values WHERE len = p_len AND sealed_by = 'auto'));
BEGIN
    PERFORM set_config('byok.aes_gcm_implementation', p_impl, true);
    raw := set_byte(raw, length(raw) - 1, get_byte(raw, length(raw) - 1) # 1);
    PERFORM byok.decrypt(('byok:' || encode(raw, 'base64'))::byok.encrypted, 'gcm_values.sealed');
    RETURN 'opened';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
SELECT impl, len, gcm_tampered_fails(impl, len)
  FROM unnest(ARRAY['rustcrypto', 'aws-lc']) impl, unnest(ARRAY[100, 1000]) len ORDER BY 1, 2;

-- Only a superuser chooses.
CREATE ROLE gcm_app;
SET ROLE gcm_app;
SET byok.aes_gcm_implementation = 'aws-lc';
-- byok.crypto_info() is for administrators and monitoring (it reruns a
-- known-answer test).
SELECT * FROM byok.crypto_info();
RESET ROLE;
DROP ROLE gcm_app;

-- What this build runs on: a standard build (not FIPS), both implementations,
-- a NIST AES-256-GCM vector opening (and a modified tag refused) through both
-- (CREATE EXTENSION would have refused otherwise, and the server to start).
-- (the aws-lc version, the length and the CPU masked; length_for_this_cpu
-- checks that the length is the one for the CPU named)
SELECT fips_build, fips_mode, regexp_replace(module, '[0-9.]+$', 'N') AS module,
       regexp_replace(aes_gcm, 'below [0-9]+ bytes, AWS-LC [0-9.]+ from [0-9]+ \(aws-lc''s AVX-512 AES-GCM: (not )?on this CPU;',
                      'below N bytes, AWS-LC V from N (aws-lc''s AVX-512 AES-GCM: on this CPU or not;') AS aes_gcm,
       (SELECT m[1] = m[2] AND m[1] = CASE WHEN m[3] = 'not ' THEN '768' ELSE '384' END
          FROM regexp_match(aes_gcm, 'below ([0-9]+) bytes, AWS-LC [0-9.]+ from ([0-9]+) \(aws-lc''s AVX-512 AES-GCM: (not )?on this CPU;') m) AS length_for_this_cpu,
       known_answer_passed, problem
  FROM byok.crypto_info();

DROP FUNCTION gcm_seal_all(text), gcm_open_all(text), gcm_tampered_fails(text, int);
DROP TABLE gcm_values;
SELECT byok.destroy_tenant_keys('gcmco', 'gcmco');
