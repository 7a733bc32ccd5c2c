"""Encrypted columns in SQLAlchemy 2 (Core and ORM), sealed and opened in SQL.

    from byok_pg_sqlalchemy import EncryptedText, set_tenant

    class Patient(Base):
        __tablename__ = "patients"
        id: Mapped[int] = mapped_column(primary_key=True)
        ssn: Mapped[str] = mapped_column(EncryptedText(context="patients.ssn"))

    with Session(engine) as session, session.begin():
        set_tenant(session, "acme")            # SET LOCAL byok.tenant
        session.add(Patient(id=1, ssn="123-45-6789"))
        session.scalars(select(Patient)).one().ssn        # '123-45-6789'

The column is byok.encrypted in the database. Every bound value is sealed by
`byok.encrypt_text(<tenant>, value, context)` and every selected one opened by
`byok.decrypt_text(column, context)`, in the statement SQLAlchemy sends: the
application never sees ciphertext or keys. The tenant is the transaction's
`byok.tenant` (set_tenant) unless the type names one.
"""

from sqlalchemy import func, text
from sqlalchemy.types import String, UserDefinedType


class EncryptedText(UserDefinedType):
    """A byok.encrypted column read and written as text."""

    cache_ok = True

    def __init__(self, context="", tenant=None):
        self.context = context
        self.tenant = tenant

    def get_col_spec(self, **kw):
        return "byok.encrypted"

    def bind_expression(self, bindvalue):
        tenant = self.tenant if self.tenant is not None else func.current_setting("byok.tenant")
        return func.byok.encrypt_text(tenant, bindvalue, self.context, type_=self)

    def column_expression(self, column):
        return func.byok.decrypt_text(column, self.context, type_=String())

    @property
    def python_type(self):
        return str


def set_tenant(session_or_connection, tenant):
    """Restricts the current transaction to one tenant (SET LOCAL byok.tenant)."""
    session_or_connection.execute(
        text("SELECT set_config('byok.tenant', :tenant, true)"), {"tenant": tenant}
    )
