#!/usr/bin/env bash
# Searchable encryption under an index-key rotation: while the re-encryption
# job rewrites every term, four sessions look rows up through the index
# (byok.matches probes under the old and the new index key) and check every
# answer against a plaintext shadow table: no row missed, none duplicated.
# Then shredding: every probe for the tenant fails; others still work.
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
NAME=search; PORT=54380
trap 'stop_cluster search' EXIT
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
# Small, slow batches, so the job is still running while the sessions look.
start_cluster $NAME $PORT "byok.reencrypt_batch_size = 200" "byok.reencrypt_max_rows_per_second = 2500"
q() { psql_at $NAME $PORT -d postgres -qAt "$@"; }

q >/dev/null <<'SQL'
CREATE EXTENSION byok_pg;
SELECT byok.configure_tenant(format('{"customer":"c","tenant_id":"t%s","encryption":{"provider":"local","local":{"key_id":"k%s"}}}', g, g)::jsonb)
  FROM generate_series(0, 3) g;
SELECT byok.rotate_index_key('t' || g) FROM generate_series(0, 3) g;
CREATE TABLE users (id int PRIMARY KEY, tenant text NOT NULL, email byok.encrypted NOT NULL);
SELECT byok.protect_column('users', 'email', 'tenant', 'users.email');
SELECT byok.make_searchable('users', 'email', term_length => 2, normalization => 'lowercase');
-- 20,000 rows over 4 tenants; every value appears twice in its tenant (g and
-- g + 10,000), and 2-byte terms: a probe also finds rows of other values,
-- which the confirming decrypt must drop.
CREATE TABLE shadow AS
SELECT g AS id, 't' || (g % 4) AS tenant, 'User' || (g % 10000) || '@example.com' AS email
  FROM generate_series(1, 20000) g;
INSERT INTO users SELECT id, tenant, byok.encrypt_text(tenant, email, 'users.email', searchable => true) FROM shadow;
CREATE INDEX ON users (byok.term(email));
ANALYZE users;
CREATE TABLE lookups (session int, lookups int, wrong int, during_job int);
SQL
check "every row found before the rotation" \
  "$(q -c "SELECT count(*) FROM shadow s WHERE s.id % 97 = 0 AND
             (SELECT array_agg(u.id ORDER BY u.id) FROM users u WHERE byok.matches(u.email, s.tenant, lower(s.email), 'users.email'))
           = (SELECT array_agg(x.id ORDER BY x.id) FROM shadow x WHERE x.tenant = s.tenant AND x.email = s.email)")" "206"
check "the lookup uses the index" \
  "$(q -c "EXPLAIN (COSTS OFF) SELECT id FROM users WHERE byok.matches(email, 't1', 'user1@example.com', 'users.email')" | grep -c 'Index Cond: (byok.term(email) = ANY (byok.search_terms')" "1"

old_key=$(q -c "SELECT dek_id FROM byok.data_keys WHERE tenant_id = 't1' AND purpose = 'index' AND state = 'active'")
new_key=$(q -c "SELECT byok.rotate_index_key('t1')")
job=$(q -c "SELECT byok.start_reencrypt('t1')")

# Four sessions look up random rows of every tenant until the job is done.
for s in 1 2 3 4; do
  q >/dev/null <<SQL &
DO \$\$
DECLARE n int := 0; wrong int := 0; during int := 0; k int; t text; e text; got int[]; want int[];
BEGIN
  LOOP
    EXIT WHEN (SELECT state FROM byok.jobs WHERE job_id = $job) NOT IN ('pending', 'running', 'verifying') AND n >= 200;
    EXIT WHEN n >= 20000;
    IF (SELECT state FROM byok.jobs WHERE job_id = $job) = 'running' THEN during := during + 1; END IF;
    k := 1 + floor(random() * 20000)::int;
    SELECT tenant, email INTO t, e FROM shadow WHERE id = k;
    SELECT array_agg(id ORDER BY id) INTO got FROM users WHERE byok.matches(email, t, upper(e), 'users.email');
    SELECT array_agg(id ORDER BY id) INTO want FROM shadow WHERE tenant = t AND email = e;
    IF got IS DISTINCT FROM want THEN
      wrong := wrong + 1;
      RAISE WARNING 'session $s: % in % found %, expected %', e, t, got, want;
    END IF;
    n := n + 1;
  END LOOP;
  INSERT INTO lookups VALUES ($s, n, wrong, during);
END
\$\$;
SQL
done
wait
check "the job finished" "$(q -c "SELECT state FROM byok.jobs WHERE job_id = $job")" "done"
q -c "SELECT 'session ' || session || ': ' || lookups || ' lookups, ' || during_job || ' while the job ran, ' || wrong || ' wrong' FROM lookups ORDER BY session"
check "four sessions looked up rows" "$(q -c "SELECT count(*) FROM lookups")" "4"
check "lookups ran while the job rewrote terms" "$(q -c "SELECT bool_and(during_job > 0) FROM lookups")" "t"
check "no lookup missed or duplicated a row" "$(q -c "SELECT sum(wrong) FROM lookups")" "0"
check "every term of t1 is under the new index key" \
  "$(q -c "SELECT count(*) FROM users WHERE tenant = 't1' AND byok.index_key_id(email) <> $new_key")" "0"
check "the old index key is retired" "$(q -c "SELECT state FROM byok.data_keys WHERE dek_id = $old_key")" "retired"
check "other tenants' terms untouched" \
  "$(q -c "SELECT count(DISTINCT byok.index_key_id(email)) FROM users WHERE tenant <> 't1'")" "3"

# Shredding: the tenant's probes fail with "destroyed"; the others go on.
q -c "SELECT byok.destroy_tenant_keys('t2', 't2')" >/dev/null
err=$(q -c "SELECT count(*) FROM users WHERE byok.matches(email, 't2', 'user2@example.com', 'users.email')" 2>&1 || true)
grep -q 'index key .* of tenant "t2" has been destroyed' <<<"$err" && ok "probes for a shredded tenant fail: $err" || not_ok "shredded probe: $err"
check "other tenants still found" \
  "$(q -c "SELECT count(*) FROM users WHERE byok.matches(email, 't3', 'USER3@example.com', 'users.email')")" "2"
# A race: while one session moves a column onto the shared empty context (and
# holds its transaction open), another makes the column searchable. The
# registry lock is taken before the context is read, so the second waits and
# is refused: the empty context never becomes searchable.
q >/dev/null -c "CREATE TABLE race (id int, v byok.encrypted)" -c "SELECT byok.protect_column('race', 'v', NULL, 'race.v')"
q -c "BEGIN" -c "SELECT byok.protect_column('race', 'v', NULL, '')" -c "SELECT pg_sleep(2)" -c "COMMIT" >/dev/null &
sleep 1
err=$(q -c "SELECT byok.make_searchable('race', 'v')" 2>&1 || true)
wait
grep -q 'registered without a context' <<<"$err" && ok "a concurrent move onto the empty context wins the race cleanly: $err" || not_ok "race: $err"
check "the empty context has no term settings" \
  "$(q -c "SELECT count(*) FROM byok.protected_columns WHERE context = '' AND search_term_length IS NOT NULL")" "0"
# Holding the registry lock does not stall DDL (whose event trigger updates the registry).
q -c "BEGIN" -c "SELECT byok.protect_column('race', 'v', NULL, 'race.v')" -c "SELECT pg_sleep(3)" -c "COMMIT" >/dev/null &
sleep 1
check "DDL goes on while the registry lock is held" \
  "$(q -c "SET lock_timeout = '1s'" -c "CREATE TABLE ddl_meanwhile (i int)" -c "DROP TABLE ddl_meanwhile" -c "SELECT 'done'" 2>&1 | tail -1)" "done"
wait
exit $fail
