"""byok.encrypted with asyncpg (which always speaks the binary protocol).

    import asyncpg
    from byok_pg_asyncpg import register

    conn = await asyncpg.connect(dsn)
    await register(conn)                   # or asyncpg.create_pool(dsn, init=register)
    sealed = await conn.fetchval("SELECT byok.encrypt_text('acme', $1, 'notes.body')", "hi")
    await conn.execute("INSERT INTO notes (body) VALUES ($1)", sealed)
    await conn.copy_records_to_table("notes", records=[(sealed,)], columns=["body"])

asyncpg has no codec for extension types: without one it refuses binary COPY
("no binary format encoder for type encrypted"). The codec below passes the
sealed bytes (the type's binary format) through as `bytes`.
"""


async def register(conn):
    """The binary codec for byok.encrypted: sealed values are `bytes` both ways."""
    await conn.set_type_codec(
        "encrypted",
        schema="byok",
        encoder=bytes,
        decoder=bytes,
        format="binary",
    )
