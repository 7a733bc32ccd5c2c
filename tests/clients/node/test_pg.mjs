// The node-postgres recipe (clients/node/byok_pg.mjs) against a real server;
// tests/scripts/clients.sh runs it with the application role's connection string.
import pg from 'pg';
import { Encrypted, register } from '../../../clients/node/byok_pg.mjs';

const failures = [];
function check(label, got, expected) {
  const a = JSON.stringify(got), b = JSON.stringify(expected);
  if (a === b) console.log(`ok: ${label}`);
  else { console.log(`NOT OK: ${label}: got ${a}, expected ${b}`); failures.push(label); }
}
async function checkError(label, sqlstate, fragment, promise) {
  try { await promise; check(label, 'no error', 'error'); }
  catch (e) { check(`${label} (${sqlstate})`, [e.code, (e.message || '').includes(fragment)], [sqlstate, true]); }
}

const client = new pg.Client({ connectionString: process.argv[2] });
await client.connect();
try {
  await register(client, pg.types);
  const sealed = (await client.query("SELECT byok.encrypt_text('acme', $1, 'notes.body') AS v", ['héllo'])).rows[0].v;
  check('node-postgres: a fetched value is an Encrypted', sealed instanceof Encrypted, true);
  check('node-postgres: a fetched value goes back as a parameter',
    (await client.query("SELECT byok.decrypt_text($1, 'notes.body') AS p", [sealed])).rows[0].p, 'héllo');
  await client.query('TRUNCATE notes');
  for (let i = 1; i <= 20; i++) {
    await client.query("INSERT INTO notes (id, body) VALUES ($1, byok.encrypt_text('acme', $2, 'notes.body'))", [i, `note ${i}`]);
  }
  await client.query('INSERT INTO notes (id, body) VALUES ($1, $2), ($3, $4)', [100, sealed, 101, null]);
  const { rows } = await client.query('SELECT id, body FROM notes ORDER BY id');
  check('node-postgres: NULL stays NULL', rows[rows.length - 1].body, null);
  check('node-postgres: every inserted value opens',
    Number((await client.query("SELECT count(*) AS n FROM notes WHERE byok.decrypt_text(body, 'notes.body') IN ('note ' || id, 'héllo')")).rows[0].n), 21);
  // Binary results (rowMode per query): the sealed bytes, cast back in SQL.
  const bin = await client.query({ text: 'SELECT body::bytea AS b FROM notes WHERE id = 100', binary: true });
  check('node-postgres: binary results carry the envelope bytes', Buffer.compare(bin.rows[0].b, sealed.bytes), 0);
  check('node-postgres: the bytes, as bytea, cast back',
    (await client.query("SELECT byok.decrypt_text($1::bytea::byok.encrypted, 'notes.body') AS p", [sealed.bytes])).rows[0].p, 'héllo');
  await checkError('node-postgres: an ungranted tenant is refused', '42501', 'globex',
    client.query("SELECT byok.encrypt_text('globex', 'x')"));
  await checkError('node-postgres: the wrong context is refused', '22000', 'authentication failed',
    client.query("SELECT byok.decrypt_text($1, 'other')", [sealed]));
  await checkError('node-postgres: a malformed value is refused', '22P02', 'byok.encrypted',
    client.query('SELECT byok.decrypt_text($1)', ['byok:AAAA']));
} finally {
  await client.end();
}
if (failures.length) console.log(`${failures.length} node-postgres check(s) failed`);
process.exit(failures.length ? 1 : 0);
