-- byok_pg needs to be in shared_preload_libraries; then:
CREATE EXTENSION byok_pg;
-- Everything lives in schema byok.
SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'byok' ORDER BY 1;
-- Errors in these tests show their message, detail and hint, then their SQLSTATE.
-- Each of the other files creates the extension if it is missing, and the
-- helpers it uses, so any one of them runs alone.
