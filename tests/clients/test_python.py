"""The Python recipes in clients/python, used as an application would, against
a real server (tests/scripts/clients.sh starts it and passes its DSN).

Each check prints "ok: ..." or "NOT OK: ..."; the exit status is 1 if any failed.
"""

import asyncio
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python"))

import asyncpg  # noqa: E402
import psycopg  # noqa: E402
from sqlalchemy import Integer, create_engine, select, text  # noqa: E402
from sqlalchemy.exc import DBAPIError  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column  # noqa: E402

import byok_pg_asyncpg  # noqa: E402
import byok_pg_psycopg  # noqa: E402
from byok_pg_psycopg import Encrypted  # noqa: E402
from byok_pg_sqlalchemy import EncryptedText, set_tenant  # noqa: E402

DSN = sys.argv[1]            # the application role, granted tenant acme only
failures = []


def check(label, got, expected):
    if got == expected:
        print(f"ok: {label}")
    else:
        print(f"NOT OK: {label}: got {got!r}, expected {expected!r}")
        failures.append(label)


def check_error(label, sqlstate, fragment, got_sqlstate, message, hint=None, hint_fragment=None):
    good = got_sqlstate == sqlstate and fragment in (message or "")
    if hint_fragment is not None:
        good = good and hint_fragment in (hint or "")
    check(f"{label} ({sqlstate})", (got_sqlstate, good), (sqlstate, True))


# --- psycopg 3 ------------------------------------------------------------------
def psycopg_checks():
    for binary in (False, True):
        mode = "binary" if binary else "text"
        with psycopg.connect(DSN, autocommit=True) as conn:
            byok_pg_psycopg.register(conn)
            cur = conn.cursor(binary=binary)
            sealed = cur.execute(
                "SELECT byok.encrypt_text('acme', %s, 'notes.body')", ["héllo"]
            ).fetchone()[0]
            check(f"psycopg {mode}: a fetched value is Encrypted", type(sealed), Encrypted)
            check(
                f"psycopg {mode}: a fetched value goes back as a parameter",
                cur.execute("SELECT byok.decrypt_text(%s, 'notes.body')", [sealed]).fetchone()[0],
                "héllo",
            )
            cur.execute("TRUNCATE notes")
            cur.executemany(
                "INSERT INTO notes (id, body) VALUES (%s, byok.encrypt_text('acme', %s, 'notes.body'))",
                [(i, f"note {i}") for i in range(1, 51)],
            )
            cur.execute("INSERT INTO notes (id, body) VALUES (%s, %s)", [100, sealed])
            cur.execute("INSERT INTO notes (id, body) VALUES (%s, %s)", [101, None])
            rows = cur.execute("SELECT id, body FROM notes ORDER BY id").fetchall()
            check(f"psycopg {mode}: NULL stays NULL", rows[-1], (101, None))
            opened = cur.execute(
                "SELECT count(*) FROM notes WHERE byok.decrypt_text(body, 'notes.body') IN ('note ' || id, 'héllo')"
            ).fetchone()[0]
            check(f"psycopg {mode}: every inserted value opens", opened, 51)
            # Plain bytes (what a driver without the adapters sends): bytea,
            # taken by assignment into the column, cast in expressions.
            raw = bytes(sealed)
            cur.execute("INSERT INTO notes (id, body) VALUES (%s, %s)", [102, raw])
            check(
                f"psycopg {mode}: plain bytes, cast",
                cur.execute("SELECT byok.decrypt_text(%s::byok.encrypted, 'notes.body')", [raw]).fetchone()[0],
                "héllo",
            )
            # Binary COPY out and back in.
            with cur.copy("COPY (SELECT id, body FROM notes WHERE id <= 50) TO STDOUT (FORMAT binary)") as copy:
                dump = b"".join(bytes(chunk) for chunk in copy)
            cur.execute("CREATE TEMP TABLE notes_copy (id int, body byok.encrypted)")
            with cur.copy("COPY notes_copy FROM STDIN (FORMAT binary)") as copy:
                copy.write(dump)
            check(
                f"psycopg {mode}: binary COPY out and in, every value opens",
                cur.execute(
                    "SELECT count(*) FROM notes_copy WHERE byok.decrypt_text(body, 'notes.body') = 'note ' || id"
                ).fetchone()[0],
                50,
            )
            with cur.copy("COPY notes_copy (id, body) FROM STDIN (FORMAT binary)") as copy:
                copy.set_types(["int4", "byok.encrypted"])
                copy.write_row((200, sealed))
            check(
                f"psycopg {mode}: Encrypted rows written by binary COPY",
                cur.execute("SELECT byok.decrypt_text(body, 'notes.body') FROM notes_copy WHERE id = 200").fetchone()[0],
                "héllo",
            )
            # Errors reach the application with SQLSTATE, message and hint.
            try:
                cur.execute("SELECT byok.encrypt_text('globex', 'x')")
                check(f"psycopg {mode}: an ungranted tenant is refused", "no error", "error")
            except psycopg.Error as e:
                check_error(f"psycopg {mode}: an ungranted tenant is refused", "42501", "globex",
                            e.sqlstate, e.diag.message_primary)
            try:
                cur.execute("SELECT byok.decrypt_text(%s, 'another.context')", [sealed])
                check(f"psycopg {mode}: the wrong context is refused", "no error", "error")
            except psycopg.Error as e:
                check_error(f"psycopg {mode}: the wrong context is refused", "22000", "authentication failed",
                            e.sqlstate, e.diag.message_primary)
            try:
                cur.execute("SELECT %s::bytea::byok.encrypted", [b"\x01\x02"])
                check(f"psycopg {mode}: bytes that are not a value", "no error", "error")
            except psycopg.Error as e:
                check_error(f"psycopg {mode}: bytes that are not a value", "22P02", "byok.encrypted",
                            e.sqlstate, e.diag.message_primary, e.diag.message_hint, "sealed value")
            try:
                cur.execute("SELECT 'byok:not-base64'::byok.encrypted")
                check(f"psycopg {mode}: a malformed literal", "no error", "error")
            except psycopg.Error as e:
                check_error(f"psycopg {mode}: a malformed literal", "22P02", "base64",
                            e.sqlstate, e.diag.message_primary, e.diag.message_hint, "byok.encrypt()")


# --- asyncpg ----------------------------------------------------------------------
async def asyncpg_checks():
    conn = await asyncpg.connect(DSN)
    await byok_pg_asyncpg.register(conn)
    try:
        sealed = await conn.fetchval("SELECT byok.encrypt_text('acme', $1, 'notes.body')", "héllo")
        check("asyncpg: a fetched value is bytes", type(sealed), bytes)
        check("asyncpg: a fetched value goes back as a parameter",
              await conn.fetchval("SELECT byok.decrypt_text($1, 'notes.body')", sealed), "héllo")
        await conn.execute("TRUNCATE notes")
        await conn.executemany(
            "INSERT INTO notes (id, body) VALUES ($1, byok.encrypt_text('acme', $2, 'notes.body'))",
            [(i, f"note {i}") for i in range(1, 51)],
        )
        records = await conn.fetch("SELECT id + 1000 AS id, body FROM notes")
        await conn.copy_records_to_table("notes", records=[tuple(r) for r in records] + [(2000, None)],
                                         columns=["id", "body"])
        check("asyncpg: binary COPY of fetched values, every one opens",
              await conn.fetchval(
                  "SELECT count(*) FROM notes WHERE id > 1000 AND id < 2000"
                  " AND byok.decrypt_text(body, 'notes.body') = 'note ' || (id - 1000)"),
              50)
        check("asyncpg: NULL through binary COPY",
              await conn.fetchval("SELECT body IS NULL FROM notes WHERE id = 2000"), True)
        buf = io.BytesIO()
        await conn.copy_from_query("SELECT id, body FROM notes WHERE id <= 50", output=buf, format="binary")
        await conn.execute("CREATE TEMP TABLE notes_copy (id int, body byok.encrypted)")
        buf.seek(0)
        await conn.copy_to_table("notes_copy", source=buf, format="binary")
        check("asyncpg: binary COPY out and in",
              await conn.fetchval(
                  "SELECT count(*) FROM notes_copy WHERE byok.decrypt_text(body, 'notes.body') = 'note ' || id"),
              50)
        for label, sql, args, state, fragment, hint in [
            ("asyncpg: an ungranted tenant is refused", "SELECT byok.encrypt_text('globex', 'x')", [],
             "42501", "globex", None),
            ("asyncpg: the wrong context is refused", "SELECT byok.decrypt_text($1, 'other')", [sealed],
             "22000", "authentication failed", None),
            ("asyncpg: bytes that are not a value", "SELECT $1::bytea::byok.encrypted", [b"\x01"],
             "22P02", "byok.encrypted", "sealed value"),
        ]:
            try:
                await conn.fetchval(sql, *args)
                check(label, "no error", "error")
            except asyncpg.PostgresError as e:
                check_error(label, state, fragment, e.sqlstate, e.message, e.hint, hint)
    finally:
        await conn.close()


# --- SQLAlchemy ORM -----------------------------------------------------------------
class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ssn: Mapped[str] = mapped_column(EncryptedText(context="patients.ssn"))
    note: Mapped[str | None] = mapped_column(EncryptedText(context="patients.note"), nullable=True)


def sqlalchemy_checks():
    engine = create_engine(DSN.replace("postgresql://", "postgresql+psycopg://", 1))
    with Session(engine) as session, session.begin():
        set_tenant(session, "acme")
        session.add_all([Patient(id=i, ssn=f"000-00-{i:04d}", note=None if i % 2 else f"n{i}")
                         for i in range(1, 21)])
    with Session(engine) as session, session.begin():
        set_tenant(session, "acme")
        patients = session.scalars(select(Patient).order_by(Patient.id)).all()
        check("SQLAlchemy: the ORM reads plaintext", [(p.ssn, p.note) for p in patients[:2]],
              [("000-00-0001", None), ("000-00-0002", "n2")])
        patients[0].ssn = "999-99-9999"
    with Session(engine) as session, session.begin():
        set_tenant(session, "acme")
        check("SQLAlchemy: an update through the ORM", session.get(Patient, 1).ssn, "999-99-9999")
        raw = session.execute(text("SELECT ssn::text FROM patients WHERE id = 1")).scalar_one()
        check("SQLAlchemy: the table holds ciphertext", (raw.startswith("byok:"), "999" in raw), (True, False))
        check("SQLAlchemy: a filter on another column",
              session.scalars(select(Patient.ssn).where(Patient.id == 3)).one(), "000-00-0003")
    with Session(engine) as session:
        try:
            with session.begin():
                set_tenant(session, "globex")
                session.add(Patient(id=99, ssn="x"))
            check("SQLAlchemy: an ungranted tenant is refused", "no error", "error")
        except DBAPIError as e:
            check_error("SQLAlchemy: an ungranted tenant is refused", "42501", "globex",
                        e.orig.sqlstate, e.orig.diag.message_primary)
    engine.dispose()


# --- SQLAlchemy ORM through a transparent view (byok.make_transparent) ----------------
class Account(Base):
    """Mapped to the view: plain String columns, no byok_pg code in the application."""
    __tablename__ = "accounts_decrypted"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str]
    owner: Mapped[str]
    iban: Mapped[str | None]
    memo: Mapped[str | None]


def transparent_checks():
    engine = create_engine(DSN.replace("postgresql://", "postgresql+psycopg://", 1))
    with Session(engine) as session, session.begin():
        session.add_all([Account(tenant="acme", owner=f"o{i}", iban=f"DE{i:020d}", memo=None if i % 2 else "m")
                         for i in range(1, 11)])
        session.flush()
        ids = sorted(a.id for a in session.scalars(select(Account)))
        check("transparent view: the ORM inserts and gets ids back (RETURNING)", len(ids), 10)
    with Session(engine) as session, session.begin():
        account = session.scalars(select(Account).where(Account.owner == "o2")).one()
        check("transparent view: the ORM reads plaintext", (account.iban, account.memo), (f"DE{2:020d}", "m"))
        account.memo = account.memo + " (checked)"
    with Session(engine) as session, session.begin():
        check("transparent view: an ORM update", session.scalars(
            select(Account.memo).where(Account.owner == "o2")).one(), "m (checked)")
        raw = session.execute(text("SELECT iban::text FROM accounts WHERE owner = 'o2'")).scalar_one()
        check("transparent view: the table holds ciphertext", (raw.startswith("byok:"), "DE" in raw), (True, False))
        session.delete(session.scalars(select(Account).where(Account.owner == "o3")).one())
    with Session(engine) as session:
        check("transparent view: an ORM delete", session.scalars(
            select(Account).where(Account.owner == "o3")).all(), [])
    with Session(engine) as session:
        try:
            with session.begin():
                session.add(Account(tenant="globex", owner="eve", iban="x"))
            check("transparent view: an ungranted tenant is refused", "no error", "error")
        except DBAPIError as e:
            check_error("transparent view: an ungranted tenant is refused", "42501", "globex",
                        e.orig.sqlstate, e.orig.diag.message_primary)
    engine.dispose()


psycopg_checks()
asyncio.run(asyncpg_checks())
sqlalchemy_checks()
transparent_checks()
if failures:
    print(f"{len(failures)} Python client check(s) failed")
sys.exit(1 if failures else 0)
