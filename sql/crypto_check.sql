-- CREATE EXTENSION (and ALTER EXTENSION ... UPDATE) refuses to install over
-- cryptography that fails its checks: in a FIPS build, a module not in FIPS
-- mode; in any build, an AES-256-GCM implementation failing a NIST
-- known-answer test. byok.crypto_info() runs the checks and names the problem.
-- (The server runs them too when it loads the library, and refuses to start.)
DO $crypto_check$
DECLARE
    info record;
BEGIN
    SELECT * INTO info FROM byok.crypto_info();
    IF info.problem IS NOT NULL THEN
        RAISE EXCEPTION 'byok_pg cannot be installed: %', info.problem
            USING ERRCODE = '58000',
                  DETAIL = format('module %s, FIPS build %s, FIPS mode %s',
                                  info.module, info.fips_build, info.fips_mode),
                  HINT = 'Check the server''s CPU and the byok_pg library''s build (docs/security.md, "FIPS build").';
    END IF;
END
$crypto_check$;
