//! The registry of protected columns as the rest of the extension reads it:
//! which columns are registered (checked again at every use: the table must
//! still be a permanent ordinary or partitioned table, the column still
//! `byok.encrypted`), and how to run a statement against one — as the table's
//! owner, inside a security-restricted operation, with search_path pinned and
//! row-level security off, so the owner's triggers, index expressions and
//! rules run with the owner's rights, never the extension's (a forced
//! row-level security policy makes the statement fail rather than leave rows
//! unseen). Used by re-encryption jobs and by `destroy_data_key`'s reference count.

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::catalog;
use crate::errors::ByokError;
use crate::keyring::JobScope;
use crate::postgres::security::{self, SwitchedUser};
use crate::postgres::spi::NotNull;
use crate::postgres::spi::Required;

/// A registered column, with its table's current owner and qualified name.
#[derive(Debug, Clone)]
pub struct Column {
    pub relid: pg_sys::Oid,
    /// Schema-qualified and quoted, ready for SQL.
    pub table: String,
    pub column: String,
    pub context: String,
    pub owner: pg_sys::Oid,
}

/// `name` as a quoted SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The registered columns (of one table, or all), in a stable order, skipping
/// any whose table or column no longer exists (the event trigger removes such
/// rows; this covers the moment before it runs).
pub fn registered_columns(relid: Option<pg_sys::Oid>) -> Result<Vec<Column>, ByokError> {
    let rows: Vec<(pg_sys::Oid, String, String, String)> = Spi::connect(|client| {
        let table = client.select(
            "SELECT r.relid::pg_catalog.oid,
                    pg_catalog.quote_ident(n.nspname) OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(c.relname),
                    a.attname::pg_catalog.text, r.context
               FROM byok.protected_column_registry r
               JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) r.relid
               JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
               JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) r.relid
                                             AND a.attnum OPERATOR(pg_catalog.=) r.attnum
                                             AND NOT a.attisdropped
              WHERE ($1::pg_catalog.oid IS NULL OR r.relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid)
                -- Checked at every use, not only at registration: an owner may
                -- have turned the table into a view, or made it unlogged, since.
                AND c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}') AND c.relpersistence OPERATOR(pg_catalog.=) 'p'
                AND a.atttypid OPERATOR(pg_catalog.=) 'byok.encrypted'::pg_catalog.regtype
              ORDER BY r.relid::pg_catalog.oid, a.attname",
            None,
            &[DatumWithOid::from(relid)],
        )?;
        let mut out = Vec::new();
        for row in table {
            out.push((
                row.required::<pg_sys::Oid>(1)?,
                row.required::<String>(2)?,
                row.required::<String>(3)?,
                row.required::<String>(4)?,
            ));
        }
        Ok::<_, ByokError>(out)
    })?;
    Ok(rows
        .into_iter()
        .filter_map(|(relid, table, column, context)| {
            Some(Column {
                owner: security::relation_owner(relid)?,
                relid,
                table,
                column,
                context,
            })
        })
        .collect())
}

/// Runs `f` as `column`'s table owner in a security-restricted operation,
/// with row-level security off. With `job`, `byok.reencrypt` and
/// `byok.value_opens` act for the job's tenant (`Some(None)`: all tenants);
/// without, keys are used on nobody's authority but the owner's grants.
pub fn as_table_owner<R>(
    column: &Column,
    job: Option<Option<&str>>,
    f: impl FnOnce() -> Result<R, ByokError>,
) -> Result<R, ByokError> {
    let _owner = SwitchedUser::as_table_owner(column.owner);
    set_local(c"row_security", c"off");
    let _scope = job.map(JobScope::enter);
    crate::postgres::session::acting_as_current_user(f)
}

/// Sets a setting until the enclosing GUC level (the owner switch's) ends.
fn set_local(name: &std::ffi::CStr, value: &std::ffi::CStr) {
    // (names are C string literals at every call site)
    // SAFETY: GUC_ACTION_SAVE inside the nest level SwitchedUser opened; it is
    // undone when that guard drops.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
    }
}

/// `SELECT count(*)` of `column`'s table under `condition` (`$col` names the
/// column), as the table's owner.
pub fn count_in(column: &Column, condition: &str, args: &[DatumWithOid]) -> Result<i64, ByokError> {
    // (the column into the condition first: a table's name may itself contain "$col")
    let condition = condition.replace("$col", &quote_ident(&column.column));
    let sql = format!("SELECT count(*) FROM {} WHERE {condition}", column.table);
    as_table_owner(column, None, || {
        catalog::read_one::<i64>(&sql, args)?.not_null("count of values")
    })
}

/// The condition "the value in `column` (an SQL expression) is sealed under,
/// or has its term computed under, one of the keys in `keys` (an SQL bigint[])".
/// (Before `ALTER EXTENSION byok_pg UPDATE` brings `byok.index_key_id`, no
/// value has a term, and the condition is on data keys alone.)
pub fn under_keys(column: &str, keys: &str) -> Result<String, ByokError> {
    let searchable = search_installed()?;
    let data = format!("byok.data_key_id({column}) OPERATOR(pg_catalog.=) ANY ({keys})");
    Ok(match searchable {
        true => {
            format!("({data} OR byok.index_key_id({column}) OPERATOR(pg_catalog.=) ANY ({keys}))")
        }
        false => data,
    })
}

/// Whether the database has the SQL side of searchable encryption (0.2.0:
/// `byok.index_key_id`); between installing this library and `ALTER EXTENSION
/// byok_pg UPDATE` it does not, and no value has a term.
pub fn search_installed() -> Result<bool, ByokError> {
    Ok(catalog::read_one::<bool>(
        "SELECT pg_catalog.to_regprocedure('byok.index_key_id(byok.encrypted)') IS NOT NULL",
        &[],
    )?
    .unwrap_or(false))
}

/// How many values of registered columns data key `dek_id` seals, or index
/// key `dek_id` computed the term of (`destroy_data_key` refuses while it is
/// above zero).
pub fn data_key_references(dek_id: i64) -> Result<i64, ByokError> {
    let columns = catalog::as_extension_owner(|| registered_columns(None))?;
    let condition = under_keys("$col", "ARRAY[$1::pg_catalog.int8]")?;
    let mut total = 0;
    for column in &columns {
        total += count_in(column, &condition, &[DatumWithOid::from(dek_id)])?;
    }
    Ok(total)
}
