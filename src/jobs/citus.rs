//! Re-encryption jobs on Citus distributed tables.
//!
//! Citus refuses a volatile function (`byok.reencrypt`) in an UPDATE of a
//! distributed table, so the coordinator's job does not rewrite through the
//! distributed table: it sends one statement per shard placement to the node
//! holding it (Citus's `master_run_on_worker`, as the extension's owner), and
//! that node rewrites its shard as a local table (`byok.citus_reencrypt_shard`:
//! as the table's owner, in a security-restricted operation, with the job's
//! tenant as its authority). The shards go in parallel; each statement commits
//! on its own node. A value is rewritten only while it is under an old key,
//! so a statement repeated after a crash has nothing to do twice.

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::columns::Column;
use crate::errors::ByokError;
use crate::postgres::security;
use crate::postgres::spi::Required;

/// Whether `column`'s table is a Citus distributed table (hash or range).
pub fn is_distributed(column: &Column) -> Result<bool, ByokError> {
    match crate::catalog::citus_partition_method(column.relid)?.as_deref() {
        None => Ok(false),
        Some("h") | Some("r") | Some("a") => Ok(true),
        // A reference table's placements must stay byte for byte the same:
        // rewriting each on its own node would seal each copy anew.
        Some(_) => Err(ByokError::WrongState {
            message: format!(
                "{}.{} is in a Citus reference table, which re-encryption jobs do not rewrite",
                column.table, column.column
            ),
            detail: Some("each copy would be sealed anew, and the copies would differ".into()),
            hint: Some("keep encrypted columns in distributed tables".into()),
        }),
    }
}

/// Runs `template` (a `format()` string taking the table, the shard id, the
/// column, its context, the tenant, the keys and, if given, `batch`) on the
/// node of every placement of `column`'s table, at once; returns the sum of
/// the bigint each returns. Call as the extension's owner.
pub fn on_every_shard(
    column: &Column,
    template: &str,
    tenant: Option<&str>,
    keys: &[i64],
    batch: Option<i32>,
) -> Result<i64, ByokError> {
    // (the table by its OID's text form, quoted by %L: a name is never spliced unquoted)
    let (nodes, ports, commands): (Vec<String>, Vec<i32>, Vec<String>) = Spi::connect(|client| {
        let rows = client.select(
            "SELECT n.nodename::pg_catalog.text, n.nodeport,
                    pg_catalog.format($2, $1::pg_catalog.regclass::pg_catalog.text, s.shardid, $3, $4, $5, $6, $7)
               FROM pg_catalog.pg_dist_shard s
               JOIN pg_catalog.pg_dist_placement p ON p.shardid OPERATOR(pg_catalog.=) s.shardid
                                                   AND p.shardstate OPERATOR(pg_catalog.=) 1
               JOIN pg_catalog.pg_dist_node n ON n.groupid OPERATOR(pg_catalog.=) p.groupid
                                              AND n.noderole OPERATOR(pg_catalog.=) 'primary'
              WHERE s.logicalrelid OPERATOR(pg_catalog.=) $1::pg_catalog.oid
              ORDER BY s.shardid",
            None,
            &[
                DatumWithOid::from(column.relid),
                DatumWithOid::from(template),
                DatumWithOid::from(column.column.as_str()),
                DatumWithOid::from(column.context.as_str()),
                DatumWithOid::from(tenant),
                DatumWithOid::from(keys.to_vec()),
                DatumWithOid::from(batch.unwrap_or(0)),
            ],
        )?;
        let (mut nodes, mut ports, mut commands) = (Vec::new(), Vec::new(), Vec::new());
        for row in rows {
            nodes.push(row.required::<String>(1)?);
            ports.push(row.required::<i32>(2)?);
            commands.push(row.required::<String>(3)?);
        }
        Ok::<_, ByokError>((nodes, ports, commands))
    })?;
    if commands.is_empty() {
        return Ok(0);
    }
    let (total, failures) = Spi::connect(|client| {
        let rows = client.select(
            "SELECT coalesce(sum(r.result::pg_catalog.int8) FILTER (WHERE r.success), 0)::pg_catalog.int8,
                    pg_catalog.string_agg(r.node_name OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) r.node_port
                                          OPERATOR(pg_catalog.||) ': ' OPERATOR(pg_catalog.||) r.result, '; ')
                        FILTER (WHERE NOT r.success)
               FROM pg_catalog.master_run_on_worker($1, $2, $3, true) r",
            None,
            &[
                DatumWithOid::from(nodes),
                DatumWithOid::from(ports),
                DatumWithOid::from(commands),
            ],
        )?;
        let row = rows.first();
        Ok::<_, ByokError>((row.required::<i64>(1)?, row.get::<String>(2)?))
    })?;
    if let Some(failures) = failures {
        return Err(ByokError::WrongState {
            message: format!(
                "{}.{}: a shard's node failed: {failures}",
                column.table, column.column
            ),
            detail: None,
            hint: Some("the job can be resumed once every node answers".into()),
        });
    }
    Ok(total)
}

/// Runs `f` on shard `shard_id` of `table` on this node, as a registered
/// column of it; 0 when the shard is not here (moved since the coordinator
/// looked: its next batch finds it where it went). Superusers only.
pub fn on_shard(
    table: pg_sys::Oid,
    shard_id: i64,
    column: &str,
    context: &str,
    f: impl FnOnce(&Column) -> Result<i64, ByokError>,
) -> Result<i64, ByokError> {
    match shard_column(table, shard_id, column, context)? {
        Some(column) => f(&column),
        None => Ok(0),
    }
}

/// Shard `shard_id` of `table` on this node, as a registered column would be
/// (None: the shard is not here).
fn shard_column(
    table: pg_sys::Oid,
    shard_id: i64,
    column: &str,
    context: &str,
) -> Result<Option<Column>, ByokError> {
    // SAFETY: reads the current user's superuser flag.
    if !unsafe { pg_sys::superuser() } {
        return Err(ByokError::NotAllowed {
            message: "only the coordinator's re-encryption job works on shards".into(),
            detail: None,
            hint: Some(
                "start a job on the coordinator: SELECT byok.start_reencrypt(tenant_id)".into(),
            ),
        });
    }
    let shard = Spi::connect(|client| {
        let rows = client.select(
            // (not through pg_class: Citus hides shards from queries on it;
            // with search_path pinned, regclass's text is schema-qualified)
            "SELECT s.r::pg_catalog.oid, s.r::pg_catalog.text,
                    (SELECT a.atttypid OPERATOR(pg_catalog.=) 'byok.encrypted'::pg_catalog.regtype
                       FROM pg_catalog.pg_attribute a
                      WHERE a.attrelid OPERATOR(pg_catalog.=) s.r AND a.attname OPERATOR(pg_catalog.=) $3
                        AND NOT a.attisdropped)
               FROM (SELECT pg_catalog.to_regclass(pg_catalog.shard_name($1::pg_catalog.oid::pg_catalog.regclass, $2, false)) AS r) s
              WHERE s.r IS NOT NULL",
            Some(1),
            &[
                DatumWithOid::from(table),
                DatumWithOid::from(shard_id),
                DatumWithOid::from(column),
            ],
        )?;
        if rows.is_empty() {
            return Ok::<_, ByokError>(None);
        }
        let row = rows.first();
        Ok(Some((
            row.required::<pg_sys::Oid>(1)?,
            row.required::<String>(2)?,
            row.get::<bool>(3)?.unwrap_or(false),
        )))
    })?;
    let Some((relid, name, encrypted)) = shard else {
        return Ok(None);
    };
    if !encrypted {
        return Err(ByokError::WrongType {
            message: format!("{name}.{column} is not a byok.encrypted column"),
            hint: "the coordinator's registry and this shard disagree".into(),
        });
    }
    let owner = security::relation_owner(relid)
        .ok_or_else(|| ByokError::Catalog(format!("shard {name} has no owner")))?;
    Ok(Some(Column {
        relid,
        table: name,
        column: column.to_string(),
        context: context.to_string(),
        owner,
    }))
}
