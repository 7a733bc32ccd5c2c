#!/usr/bin/env bash
# pg_dump of a database with encrypted columns, restored:
#  1. into another database of the same cluster: every row decrypts, and a
#     searchable column is found through its restored index;
#  2. into a fresh cluster given a copy of the master key file: every row decrypts;
#  3. into a fresh cluster without the key file: the restore keeps every value, and
#     decrypting fails clearly until the key file is put back.
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
SRC=54335; DST=54336; NOKEY=54337
trap 'stop_cluster dump_src; stop_cluster dump_dst; stop_cluster dump_nokey' EXIT
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"

start_cluster dump_src $SRC
psql_at dump_src $SRC -d postgres -q -c "CREATE DATABASE app"
psql_at dump_src $SRC -d app -q >/dev/null <<'SQL'
CREATE EXTENSION byok_pg;
SELECT byok.configure_tenant('{"customer":"acme","tenant_id":"acme","encryption":{"provider":"local","local":{"key_id":"acme-cmk"}}}');
SELECT byok.configure_tenant('{"customer":"globex","tenant_id":"globex","encryption":{"provider":"local","local":{"key_id":"globex-cmk"}}}');
CREATE TABLE people (id int PRIMARY KEY, tenant text, ssn byok.encrypted);
INSERT INTO people SELECT g, CASE WHEN g % 2 = 0 THEN 'acme' ELSE 'globex' END,
       byok.encrypt_text(CASE WHEN g % 2 = 0 THEN 'acme' ELSE 'globex' END, 'ssn-' || g, 'people.ssn:' || g)
  FROM generate_series(1, 2000) g;
-- a rotation in the middle, so two keys of one tenant are in use
SELECT byok.rotate_data_key('acme');
UPDATE people SET ssn = byok.encrypt_text('acme', 'ssn-' || id, 'people.ssn:' || id) WHERE tenant = 'acme' AND id > 1000;
-- a searchable column with its index on the terms
SELECT byok.rotate_index_key('acme');
CREATE TABLE contacts (id int PRIMARY KEY, email byok.encrypted);
SELECT byok.protect_column('contacts', 'email', NULL, 'contacts.email');
SELECT byok.make_searchable('contacts', 'email', normalization => 'lowercase');
INSERT INTO contacts SELECT g, byok.encrypt_text('acme', 'c' || g || '@example.com', 'contacts.email', searchable => true)
  FROM generate_series(1, 500) g;
CREATE INDEX contacts_email_term ON contacts (byok.term(email));
SQL
lookup_sql="SET enable_seqscan = off; SELECT id FROM contacts WHERE byok.matches(email, 'acme', 'C42@example.com', 'contacts.email')"
explain_sql="SET enable_seqscan = off; EXPLAIN (COSTS OFF) SELECT id FROM contacts WHERE byok.matches(email, 'acme', 'C42@example.com', 'contacts.email')"
sum_sql="SELECT count(*) || ':' || md5(string_agg(byok.decrypt_text(ssn, 'people.ssn:' || id), ',' ORDER BY id)) FROM people"
raw_sql="SELECT count(*) || ':' || md5(string_agg(ssn::text, ',' ORDER BY id)) FROM people"
expected=$(psql_at dump_src $SRC -d app -qAt -c "$sum_sql")
expected_raw=$(psql_at dump_src $SRC -d app -qAt -c "$raw_sql")
check "source decrypts" "$(psql_at dump_src $SRC -d app -qAt -c "SELECT count(*) FROM people WHERE byok.decrypt_text(ssn, 'people.ssn:' || id) = 'ssn-' || id")" "2000"

dump="$BYOK_WORK/app.dump"
"$PG_BIN/pg_dump" -h "$BYOK_WORK/dump_src" -p $SRC -U postgres -Fc -f "$dump" app
check "dump carries the key catalog" "$("$PG_BIN/pg_restore" -f - "$dump" | grep -c 'COPY byok.wrapped_data_keys\|COPY byok.tenant_config')" "2"

# 1. same cluster, another database
psql_at dump_src $SRC -d postgres -q -c "CREATE DATABASE app_copy"
"$PG_BIN/pg_restore" -h "$BYOK_WORK/dump_src" -p $SRC -U postgres -d app_copy --exit-on-error "$dump"
check "restored in the same cluster" "$(psql_at dump_src $SRC -d app_copy -qAt -c "$sum_sql")" "$expected"
check "searchable lookups after restore" "$(psql_at dump_src $SRC -d app_copy -qAt -c "$lookup_sql")" "42"
check "through the restored index" "$(psql_at dump_src $SRC -d app_copy -qAt -c "$explain_sql" | grep -c 'contacts_email_term')" "1"
# The key id sequence is restored too, or this rotation would collide with a restored id.
check "key ids continue after restore" \
  "$(psql_at dump_src $SRC -d app_copy -qAt -c "SELECT byok.rotate_data_key('globex') > max(dek_id) - 1 FROM byok.data_keys")" "t"

# 2. a fresh cluster with a copy of the master key file
start_cluster dump_dst $DST
install -o postgres -m 600 "$BYOK_WORK/dump_src/data/byok_local_master.key" "$BYOK_WORK/dump_dst/data/byok_local_master.key"
psql_at dump_dst $DST -d postgres -q -c "CREATE DATABASE app"
"$PG_BIN/pg_restore" -h "$BYOK_WORK/dump_dst" -p $DST -U postgres -d app --exit-on-error "$dump"
check "restored in a cluster with the key file" "$(psql_at dump_dst $DST -d app -qAt -c "$sum_sql")" "$expected"
check "searchable lookups in the other cluster" "$(psql_at dump_dst $DST -d app -qAt -c "$lookup_sql")" "42"
check "new values after restore" "$(psql_at dump_dst $DST -d app -qAt -c "SELECT byok.decrypt_text(byok.encrypt_text('acme', 'new'))")" "new"

# 3. a fresh cluster without the key file: nothing lost, clear error, recoverable
start_cluster dump_nokey $NOKEY
psql_at dump_nokey $NOKEY -d postgres -q -c "CREATE DATABASE app"
"$PG_BIN/pg_restore" -h "$BYOK_WORK/dump_nokey" -p $NOKEY -U postgres -d app --exit-on-error "$dump"
check "every value restored unchanged" "$(psql_at dump_nokey $NOKEY -d app -qAt -c "$raw_sql")" "$expected_raw"
err=$(psql_at dump_nokey $NOKEY -d app -qAt -c "SELECT byok.decrypt_text(ssn, 'people.ssn:' || id) FROM people LIMIT 1" 2>&1 || true)
echo "$err"
grep -q 'local master key file .* does not exist' <<<"$err" && echo "ok: clear error without the key file" || { echo "NOT OK: unclear error"; fail=1; }
grep -q 'restore the file from your key backup' <<<"$err" && echo "ok: hint names the remedy" || { echo "NOT OK: no hint"; fail=1; }
install -o postgres -m 600 "$BYOK_WORK/dump_src/data/byok_local_master.key" "$BYOK_WORK/dump_nokey/data/byok_local_master.key"
check "decrypts once the key file is back" "$(psql_at dump_nokey $NOKEY -d app -qAt -c "$sum_sql")" "$expected"

# The key file never appears in the dump.
key_hex=$(tr -d '\n' < "$BYOK_WORK/dump_src/data/byok_local_master.key")
"$PG_BIN/pg_restore" -f - "$dump" | grep -qi "$key_hex" && { echo "NOT OK: master key in dump"; fail=1; } || echo "ok: master key not in the dump"
exit $fail
