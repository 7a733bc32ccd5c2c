-- byok_pg on Citus: where encryption and decryption run.
-- (Run by tests/scripts/citus.sh on its coordinator, after
-- byok.citus_distribute_catalog() and the tenants t0..t31.)
\set VERBOSITY terse

-- A table distributed by tenant id.
CREATE TABLE golden_accounts (tenant_id text NOT NULL, id int NOT NULL, secret byok.encrypted);
SELECT create_distributed_table('golden_accounts', 'tenant_id', shard_count => 4);

-- INSERT ... VALUES through the coordinator: Citus evaluates byok.encrypt_text
-- on the coordinator, then routes the sealed row to the shard's worker.
INSERT INTO golden_accounts VALUES
    ('t1', 1, byok.encrypt_text('t1', 'alice', 'golden_accounts.secret')),
    ('t1', 2, byok.encrypt_text('t1', 'bob', 'golden_accounts.secret')),
    ('t2', 3, byok.encrypt_text('t2', 'carol', 'golden_accounts.secret')),
    ('t3', 4, byok.encrypt_text('t3', 'dave', 'golden_accounts.secret'));

-- A router query: byok.decrypt_text runs on the one worker holding t1's shard.
EXPLAIN (VERBOSE, COSTS OFF)
SELECT id, byok.decrypt_text(secret, 'golden_accounts.secret') FROM golden_accounts WHERE tenant_id = 't1';
SELECT id, byok.decrypt_text(secret, 'golden_accounts.secret') FROM golden_accounts WHERE tenant_id = 't1' ORDER BY id;

-- A multi-shard query: every shard decrypts its own rows, on its own worker.
EXPLAIN (VERBOSE, COSTS OFF)
SELECT tenant_id, byok.decrypt_text(secret, 'golden_accounts.secret') FROM golden_accounts;
SELECT tenant_id, id, byok.decrypt_text(secret, 'golden_accounts.secret') FROM golden_accounts ORDER BY id;

-- An UPDATE of an encrypted column: Citus runs no volatile function per row on
-- a shard, so the new value is sealed in a subquery (on the coordinator).
UPDATE golden_accounts SET secret = byok.encrypt_text('t1', 'alice2', 'golden_accounts.secret')
 WHERE tenant_id = 't1' AND id = 1;
UPDATE golden_accounts SET secret = (SELECT byok.encrypt_text('t1', 'alice2', 'golden_accounts.secret'))
 WHERE tenant_id = 't1' AND id = 1;
SELECT byok.decrypt_text(secret, 'golden_accounts.secret') FROM golden_accounts WHERE tenant_id = 't1' AND id = 1;

-- Values stay bound to their context and tenant on the workers too.
SELECT byok.decrypt_text(secret, 'another.context') FROM golden_accounts WHERE tenant_id = 't2';

-- A searchable column: the term index is built on every shard, and
-- byok.matches probes the index and confirms each candidate on the worker.
SELECT byok.rotate_index_key('t25') > 0 AS index_key;
CREATE TABLE golden_users (tenant_id text NOT NULL, id int NOT NULL, email byok.encrypted);
SELECT create_distributed_table('golden_users', 'tenant_id', shard_count => 4);
SELECT byok.protect_column('golden_users', 'email', 'tenant_id', 'golden_users.email');
SELECT byok.make_searchable('golden_users', 'email');
INSERT INTO golden_users
SELECT 't25', g, byok.encrypt_text('t25', 'user' || g || '@example.com', 'golden_users.email', searchable => true)
  FROM generate_series(1, 2000) g;
CREATE INDEX golden_users_term ON golden_users (byok.term(email));
ANALYZE golden_users;
EXPLAIN (VERBOSE, COSTS OFF)
SELECT id FROM golden_users WHERE tenant_id = 't25' AND byok.matches(email, 't25', 'user42@example.com', 'golden_users.email');
SELECT id FROM golden_users WHERE tenant_id = 't25' AND byok.matches(email, 't25', 'user42@example.com', 'golden_users.email');

DROP TABLE golden_users, golden_accounts;
