"""byok.encrypted with psycopg 3, in text and binary mode.

    import psycopg
    from byok_pg_psycopg import Encrypted, register

    conn = psycopg.connect(dsn)
    register(conn)                      # once per connection (or pool configure=)
    sealed = conn.execute("SELECT byok.encrypt_text('acme', %s, 'notes.body')", ["hi"]).fetchone()[0]
    assert isinstance(sealed, Encrypted)                     # text or binary mode alike
    conn.execute("INSERT INTO notes (body) VALUES (%s)", [sealed])   # typed byok.encrypted
    conn.execute("SELECT byok.decrypt_text(%s, 'notes.body')", [sealed])

A fetched value loads as `Encrypted` (the sealed bytes, i.e. the type's binary
format) whichever format the server sent, and an `Encrypted` parameter is sent
typed as byok.encrypted, so it works in function calls, comparisons and COPY
without a cast. Plain `bytes` parameters stay bytea: they go into a
byok.encrypted column by assignment, and need `%s::byok.encrypted` elsewhere.
"""

import base64

from psycopg.adapt import Dumper, Loader
from psycopg.pq import Format
from psycopg.types import TypeInfo

TEXT_PREFIX = b"byok:"


class Encrypted(bytes):
    """A sealed byok_pg value: its envelope bytes (ciphertext, safe to log)."""

    def __repr__(self):
        return f"Encrypted({len(self)} bytes)"


def register(conn_or_cursor):
    """Registers the loaders and dumpers on a connection (or cursor) context."""
    info = TypeInfo.fetch(conn_or_cursor, "byok.encrypted")
    if info is None:
        raise LookupError("type byok.encrypted not found: CREATE EXTENSION byok_pg first")
    oid = info.oid

    class TextLoader(Loader):
        def load(self, data):
            text = bytes(data)
            if not text.startswith(TEXT_PREFIX):
                raise ValueError("not a byok.encrypted text value")
            return Encrypted(base64.b64decode(text[len(TEXT_PREFIX):]))

    class BinaryLoader(Loader):
        format = Format.BINARY

        def load(self, data):
            return Encrypted(bytes(data))

    class TextDumper(Dumper):
        def dump(self, obj):
            return TEXT_PREFIX + base64.b64encode(obj)

    class BinaryDumper(Dumper):
        format = Format.BINARY

        def dump(self, obj):
            return bytes(obj)

    TextDumper.oid = oid
    BinaryDumper.oid = oid
    info.register(conn_or_cursor)   # (so COPY's set_types() knows "byok.encrypted")
    adapters = conn_or_cursor.adapters
    adapters.register_loader(oid, TextLoader)
    adapters.register_loader(oid, BinaryLoader)
    adapters.register_dumper(Encrypted, TextDumper)
    adapters.register_dumper(Encrypted, BinaryDumper)
    return info
