// byok.encrypted with node-postgres (pg).
//
//   import pg from 'pg';
//   import { Encrypted, register } from './byok_pg.mjs';
//
//   const client = new pg.Client(config);
//   await client.connect();
//   await register(client, pg.types);  // once per process: pg's type parsers are global
//   const { rows } = await client.query("SELECT byok.encrypt_text('acme', $1, 'notes.body') AS v", ['hi']);
//   rows[0].v instanceof Encrypted;     // true: the sealed bytes in .bytes
//   await client.query('SELECT byok.decrypt_text($1, $2)', [rows[0].v, 'notes.body']);
//
// pg reads results as text: a byok.encrypted arrives as 'byok:' + base64 and
// is parsed into an Encrypted. An Encrypted parameter is sent in that text
// form (toPostgres), which PostgreSQL reads as byok.encrypted wherever one is
// expected: function arguments, INSERT and UPDATE.

const PREFIX = 'byok:';

export class Encrypted {
  constructor(bytes) {
    this.bytes = Buffer.from(bytes);
  }

  static fromText(text) {
    if (!text.startsWith(PREFIX)) throw new Error('not a byok.encrypted text value');
    return new Encrypted(Buffer.from(text.slice(PREFIX.length), 'base64'));
  }

  toPostgres() {
    return PREFIX + this.bytes.toString('base64');
  }
}

// Looks up byok.encrypted's OID (it differs per database) and registers the
// parser in `types` (pg.types, process-wide; or a client's own `types` option).
export async function register(client, types) {
  const { rows } = await client.query("SELECT 'byok.encrypted'::regtype::oid AS oid");
  const oid = Number(rows[0].oid);
  types.setTypeParser(oid, 'text', Encrypted.fromText);
  return oid;
}
