//! The guide's key-compromise procedure as one resumable operation:
//! `CALL byok.respond_to_compromise(tenant_id, new_master_key)`.
//!
//! The order matters, and is the reason this exists: the data keys are
//! rewrapped under the new master key *before* anyone disables the
//! compromised one (a rewrap needs the old key to open them), values are
//! re-encrypted under a new data key before the old data keys go, and
//! nothing is destroyed until every registered value is verified to be under
//! the new key. Each step runs in its own transaction and is recorded in
//! `byok.compromise_responses`, so a crash, a cancel or a failed job is
//! resumed by calling the procedure again.
//!
//! 1. `rewrap`: every data key rewrapped under the new master key (the
//!    compromised one is kept as the previous key, with no grace period).
//! 2. `new_data_key`: a new active data key, and a new index key if the
//!    tenant has one (searchable values); the old ones are decrypt-only.
//! 3. `reencrypt`: a re-encryption job over every registered column (the
//!    procedure starts it and waits for it).
//! 4. `verify`: every transaction (and prepared transaction) older than the
//!    new data key has ended; no registered value is sealed under an old data
//!    key; no unregistered `byok.encrypted` column holds one (a column of a
//!    type built on it cannot be counted and is refused).
//! 5. `retire`: the old data keys retired, the compromised master key retired.
//! 6. `destroy`: the old data keys destroyed; the report goes to the audit trail.
//!
//! Every step is audited (`compromise_response_step`, which also raises
//! `NOTIFY byok_alerts`), and the end with its report (`compromise_response`).

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::catalog;
use crate::errors::ByokError;
use crate::postgres::spi::Required;

/// The steps, in order.
const STEPS: [&str; 7] = [
    "rewrap",
    "new_data_key",
    "reencrypt",
    "verify",
    "retire",
    "destroy",
    "done",
];

fn next_step(step: &str) -> &'static str {
    let at = STEPS
        .iter()
        .position(|s| *s == step)
        .unwrap_or(STEPS.len() - 1);
    STEPS[(at + 1).min(STEPS.len() - 1)]
}

/// A response under way, as `byok.compromise_responses` holds it.
struct Response {
    id: i64,
    compromised_key_id: String,
    new_master_key_id: String,
    old_data_keys: Vec<i64>,
    step: String,
    job_id: Option<i64>,
}

fn under_way(tenant_id: &str) -> Result<Option<Response>, ByokError> {
    Spi::connect_mut(|client| {
        let rows = client.update(
            "SELECT response_id, compromised_key_id, new_master_key_id, old_data_keys, step, job_id
               FROM byok.compromise_responses
              WHERE tenant_id = $1 AND finished_at IS NULL FOR UPDATE",
            Some(1),
            &[DatumWithOid::from(tenant_id)],
        )?;
        if rows.is_empty() {
            return Ok(None);
        }
        let row = rows.first();
        Ok(Some(Response {
            id: row.required::<i64>(1)?,
            compromised_key_id: row.required::<String>(2)?,
            new_master_key_id: row.required::<String>(3)?,
            old_data_keys: row.required::<Vec<i64>>(4)?,
            step: row.required::<String>(5)?,
            job_id: row.get::<i64>(6)?,
        }))
    })
}

/// Starts a response (the step that needs a second administrator where dual
/// control applies): the new master key is checked, the tenant's live data
/// keys are recorded as the ones to replace. Returns the response's id.
pub fn start(tenant_id: &str, new_master_key: &str) -> Result<i64, ByokError> {
    let new_master_key = new_master_key.trim();
    if let Some(response) = under_way(tenant_id)? {
        if response.new_master_key_id != new_master_key {
            return Err(ByokError::WrongState {
                message: format!(
                    "a compromise response of tenant \"{tenant_id}\" to master key \"{}\" is under way",
                    response.new_master_key_id
                ),
                detail: Some(format!(
                    "response {}, at step {}",
                    response.id, response.step
                )),
                hint: Some(format!(
                    "finish it: CALL byok.respond_to_compromise('{tenant_id}', '{}')",
                    response.new_master_key_id
                )),
            });
        }
        return Ok(response.id);
    }
    let tenant = catalog::load_tenant(tenant_id, true)?
        .ok_or_else(|| ByokError::UnknownTenant(tenant_id.to_string()))?;
    super::dr::refuse_while_active(tenant_id, &tenant, "a compromise response")?;
    if new_master_key.is_empty() {
        return Err(ByokError::InvalidArgument {
            message: "new_master_key must name the master key replacing the compromised one".into(),
            hint: None,
        });
    }
    super::policy::check_key_prefix(new_master_key)?;
    // The new key must answer, enabled and able to wrap, before anything moves.
    super::keys::check_master_key(
        tenant_id,
        tenant.provider.provider,
        &tenant.provider,
        new_master_key,
    )?;
    let role = crate::postgres::session::role_name(crate::postgres::session::acting_role());
    let id = Spi::get_one_with_args::<i64>(
        "INSERT INTO byok.compromise_responses
                (tenant_id, compromised_key_id, new_master_key_id, old_data_keys, started_by)
         SELECT $1, $2, $3, coalesce(pg_catalog.array_agg(dek_id ORDER BY dek_id), '{}'), $4
           FROM byok.wrapped_data_keys
          WHERE tenant_id OPERATOR(pg_catalog.=) $1 AND state OPERATOR(pg_catalog.<>) 'destroyed'
         RETURNING response_id",
        &[
            DatumWithOid::from(tenant_id),
            DatumWithOid::from(tenant.master_key_id.as_str()),
            DatumWithOid::from(new_master_key),
            DatumWithOid::from(role.as_str()),
        ],
    )?
    .ok_or_else(|| ByokError::Internal("the compromise response was not recorded".into()))?;
    // Values in a column the registry does not know would be left under the
    // old keys (and a re-encryption job retires keys whose registered values
    // are gone): refuse before anything moves.
    let response = Response {
        id,
        compromised_key_id: tenant.master_key_id.clone(),
        new_master_key_id: new_master_key.to_string(),
        old_data_keys: catalog::read_one::<Vec<i64>>(
            "SELECT old_data_keys FROM byok.compromise_responses WHERE response_id OPERATOR(pg_catalog.=) $1",
            &[DatumWithOid::from(id)],
        )?
        .unwrap_or_default(),
        step: "rewrap".into(),
        job_id: None,
    };
    check_unregistered_columns(tenant_id, &response)?;
    audit_step(
        tenant_id,
        id,
        "started",
        serde_json::json!({
            "compromised_key_id": tenant.master_key_id,
            "new_master_key_id": new_master_key,
        }),
    )?;
    Ok(id)
}

fn audit_step(
    tenant_id: &str,
    response_id: i64,
    step: &str,
    mut details: serde_json::Value,
) -> Result<(), ByokError> {
    details["response_id"] = response_id.into();
    details["step"] = step.into();
    catalog::audit(
        "compromise_response_step",
        Some(tenant_id),
        None,
        true,
        None,
        Some(details),
    )
}

/// Records that `step` finished (with what it found) and moves on.
fn advance(
    tenant_id: &str,
    response: &Response,
    found: serde_json::Value,
) -> Result<&'static str, ByokError> {
    let next = next_step(&response.step);
    Spi::run_with_args(
        "UPDATE byok.compromise_responses
            SET step = $2,
                report = pg_catalog.jsonb_set(report, ARRAY[$3],
                            $4 OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('finished_at', pg_catalog.clock_timestamp()))
          WHERE response_id = $1",
        &[
            DatumWithOid::from(response.id),
            DatumWithOid::from(next),
            DatumWithOid::from(response.step.as_str()),
            DatumWithOid::from(pgrx::JsonB(found.clone())),
        ],
    )?;
    audit_step(tenant_id, response.id, &response.step, found)?;
    Ok(next)
}

/// One step of the response under way. Returns what the procedure does
/// next: `"start_job"` (start the re-encryption job and record it here),
/// `"wait_job:<id>"`, `"job_failed:<id>"` (raise), `"waiting"` (sleep, then
/// call again), or the next step's name (`"done"` at the end).
pub fn step(tenant_id: &str, job_id: Option<i64>) -> Result<String, ByokError> {
    let response = under_way(tenant_id)?.ok_or_else(|| ByokError::WrongState {
        message: format!("no compromise response of tenant \"{tenant_id}\" is under way"),
        detail: None,
        hint: Some(format!(
            "CALL byok.respond_to_compromise('{tenant_id}', '<new master key>')"
        )),
    })?;
    let next = match response.step.as_str() {
        "rewrap" => {
            let result =
                super::rotation::rotate_master_key(tenant_id, &response.new_master_key_id, "0")?;
            advance(tenant_id, &response, serde_json::json!({"result": result}))?
        }
        "new_data_key" => {
            let dek_id = super::keys::rotate_data_key(tenant_id, Some("compromise response"))?;
            // The index key was wrapped by the compromised master key too:
            // whoever unwrapped it could test guesses against the terms.
            // A new one, and the job rewrites every term under it.
            let index_key = match catalog::index_keys(tenant_id)?.live.is_empty() {
                true => None,
                false => Some(super::keys::rotate_index_key(tenant_id)?),
            };
            advance(
                tenant_id,
                &response,
                serde_json::json!({"new_data_key": dek_id, "new_index_key": index_key}),
            )?
        }
        "reencrypt" => return reencrypt(tenant_id, &response, job_id),
        "verify" => verify(tenant_id, &response)?,
        "retire" => {
            for dek_id in &response.old_data_keys {
                let state = catalog::read_one::<String>(
                    "SELECT state FROM byok.wrapped_data_keys WHERE dek_id OPERATOR(pg_catalog.=) $1",
                    &[DatumWithOid::from(*dek_id)],
                )?;
                if state.as_deref() == Some("decrypt-only") {
                    super::keys::set_data_key_state(*dek_id, "retired")?;
                }
            }
            let retired = match response.compromised_key_id != response.new_master_key_id {
                true => Some(super::rotation::retire_previous_master_key(tenant_id)?),
                false => None,
            };
            advance(
                tenant_id,
                &response,
                serde_json::json!({
                    "data_keys_retired": response.old_data_keys,
                    "master_key": retired,
                }),
            )?
        }
        "destroy" => {
            for dek_id in &response.old_data_keys {
                super::keys::destroy_data_key(tenant_id, *dek_id)?;
            }
            let next = advance(
                tenant_id,
                &response,
                serde_json::json!({"data_keys_destroyed": response.old_data_keys}),
            )?;
            finish(tenant_id, &response)?;
            next
        }
        other => {
            return Err(ByokError::Catalog(format!(
                "compromise response {} is at an unknown step \"{other}\"",
                response.id
            )));
        }
    };
    Ok(next.to_string())
}

/// The re-encryption step: the procedure starts the job (as the calling
/// administrator, who must be able to run it) and hands its id back here.
fn reencrypt(
    tenant_id: &str,
    response: &Response,
    job_id: Option<i64>,
) -> Result<String, ByokError> {
    // When the new data key was certainly committed (this transaction began
    // after the one that made it): transactions older than this, which may
    // still seal under an old key, are waited for before verification.
    Spi::run_with_args(
        "UPDATE byok.compromise_responses
            SET report = report OPERATOR(pg_catalog.||)
                         pg_catalog.jsonb_build_object('keys_switched_at', pg_catalog.clock_timestamp())
          WHERE response_id = $1 AND NOT report ? 'keys_switched_at'",
        &[DatumWithOid::from(response.id)],
    )?;
    if let Some(job) = job_id {
        // Only a job of this tenant, started for this response, stands for it.
        let fits = catalog::read_one::<bool>(
            "SELECT j.tenant_id OPERATOR(pg_catalog.=) r.tenant_id AND j.relid IS NULL
                    AND j.created_at OPERATOR(pg_catalog.>=) r.started_at
               FROM byok.reencrypt_jobs j, byok.compromise_responses r
              WHERE j.job_id OPERATOR(pg_catalog.=) $1 AND r.response_id OPERATOR(pg_catalog.=) $2",
            &[DatumWithOid::from(job), DatumWithOid::from(response.id)],
        )?
        .unwrap_or(false);
        if !fits {
            return Err(ByokError::InvalidArgument {
                message: format!(
                    "re-encryption job {job} is not a job over every column of tenant \"{tenant_id}\" started for this response"
                ),
                hint: Some(format!(
                    "CALL byok.respond_to_compromise('{tenant_id}', '{}') starts its own",
                    response.new_master_key_id
                )),
            });
        }
        Spi::run_with_args(
            "UPDATE byok.compromise_responses SET job_id = $2 WHERE response_id = $1",
            &[DatumWithOid::from(response.id), DatumWithOid::from(job)],
        )?;
        audit_step(
            tenant_id,
            response.id,
            "reencrypt_started",
            serde_json::json!({"job_id": job}),
        )?;
        return Ok(format!("wait_job:{job}"));
    }
    let registered = catalog::read_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM byok.protected_column_registry)",
        &[],
    )?
    .unwrap_or(false);
    let Some(job) = response.job_id else {
        if !registered {
            return advance(
                tenant_id,
                response,
                serde_json::json!({"rows_reencrypted": 0, "note": "no registered column"}),
            )
            .map(str::to_string);
        }
        // A job left by an earlier run may have retired an old key whose
        // values it did not see (written since): this response retires and
        // destroys them itself, after verification, so the job may read them.
        Spi::run_with_args(
            "UPDATE byok.wrapped_data_keys SET state = 'decrypt-only'
              WHERE dek_id = ANY ($1) AND state = 'retired'",
            &[DatumWithOid::from(response.old_data_keys.clone())],
        )?;
        return Ok("start_job".into());
    };
    let (state, rows, error) = Spi::connect(|client| {
        let row = client.select(
            "SELECT state, rows_done, last_error FROM byok.reencrypt_jobs WHERE job_id = $1",
            Some(1),
            &[DatumWithOid::from(job)],
        )?;
        if row.is_empty() {
            return Ok::<_, ByokError>((None, 0, None));
        }
        let row = row.first();
        Ok((
            row.get::<String>(1)?,
            row.get::<i64>(2)?.unwrap_or(0),
            row.get::<String>(3)?,
        ))
    })?;
    match state.as_deref() {
        Some("done") => advance(
            tenant_id,
            response,
            serde_json::json!({"job_id": job, "rows_reencrypted": rows}),
        )
        .map(str::to_string),
        Some("failed") | Some("cancelled") | None => {
            // Forgotten, so that the next CALL starts a new job.
            Spi::run_with_args(
                "UPDATE byok.compromise_responses SET job_id = NULL WHERE response_id = $1",
                &[DatumWithOid::from(response.id)],
            )?;
            audit_step(
                tenant_id,
                response.id,
                "reencrypt_failed",
                serde_json::json!({"job_id": job, "state": state, "error": error}),
            )?;
            Ok(format!("job_failed:{job}"))
        }
        Some(_) => Ok(format!("wait_job:{job}")),
    }
}

/// No registered value under an old data key, and no unregistered column.
/// First, every transaction that began before the new data key existed must
/// have ended: one still open may commit values sealed under an old key,
/// which verification would not see and destruction would lose.
fn verify(tenant_id: &str, response: &Response) -> Result<&'static str, ByokError> {
    let older = catalog::read_one::<String>(
        "WITH r AS (SELECT (report OPERATOR(pg_catalog.->>) 'keys_switched_at')::pg_catalog.timestamptz AS switched
                      FROM byok.compromise_responses WHERE response_id OPERATOR(pg_catalog.=) $1)
         SELECT pg_catalog.string_agg(who, ', ') FROM (
             SELECT 'pid ' OPERATOR(pg_catalog.||) a.pid AS who
               FROM pg_catalog.pg_stat_activity a, r
              WHERE a.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid()
                AND a.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()
                -- (sessions and workers that may write; not autovacuum, walsenders)
                AND a.backend_type IN ('client backend', 'background worker')
                AND a.xact_start OPERATOR(pg_catalog.<) r.switched
             UNION ALL
             SELECT 'prepared transaction ' OPERATOR(pg_catalog.||) p.gid
               FROM pg_catalog.pg_prepared_xacts p, r
              WHERE p.database OPERATOR(pg_catalog.=) pg_catalog.current_database()
                AND p.prepared OPERATOR(pg_catalog.<) r.switched) w",
        &[DatumWithOid::from(response.id)],
    )?;
    if let Some(older) = older {
        // Waited for, up to WAIT_FOR_OLDER; then named, to be ended by hand.
        let waited = catalog::read_one::<f64>(
            "UPDATE byok.compromise_responses
                SET report = report OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('waiting_since',
                             coalesce(report OPERATOR(pg_catalog.->) 'waiting_since', pg_catalog.to_jsonb(pg_catalog.clock_timestamp())))
              WHERE response_id OPERATOR(pg_catalog.=) $1
             RETURNING extract(epoch FROM pg_catalog.clock_timestamp()
                               OPERATOR(pg_catalog.-) (report OPERATOR(pg_catalog.->>) 'waiting_since')::pg_catalog.timestamptz)::pg_catalog.float8",
            &[DatumWithOid::from(response.id)],
        )?
        .unwrap_or(0.0);
        if waited > WAIT_FOR_OLDER.as_secs_f64() {
            return Err(ByokError::WrongState {
                message: format!(
                    "transactions older than the new data key of tenant \"{tenant_id}\" are still open after {} s: {older}",
                    WAIT_FOR_OLDER.as_secs()
                ),
                detail: Some(
                    "they may commit values sealed under an old data key, which the next steps destroy".into(),
                ),
                hint: Some(format!(
                    "end them (COMMIT, ROLLBACK PREPARED, pg_terminate_backend), then CALL byok.respond_to_compromise('{tenant_id}', '{}') again",
                    response.new_master_key_id
                )),
            });
        }
        return Ok("waiting");
    }
    check_unregistered_columns(tenant_id, response)?;
    let mut left = serde_json::Map::new();
    for dek_id in &response.old_data_keys {
        let values = crate::columns::data_key_references(*dek_id)?;
        if values > 0 {
            left.insert(dek_id.to_string(), values.into());
        }
    }
    if !left.is_empty() {
        let retried = catalog::read_one::<bool>(
            "SELECT report ? 'verify_retry' FROM byok.compromise_responses
              WHERE response_id OPERATOR(pg_catalog.=) $1",
            &[DatumWithOid::from(response.id)],
        )?
        .unwrap_or(false);
        let left = serde_json::Value::Object(left);
        if retried {
            return Err(ByokError::WrongState {
                message: format!(
                    "values of tenant \"{tenant_id}\" are still sealed under old data keys after a second re-encryption: {left}"
                ),
                detail: Some(
                    "a value the job cannot reseal (one under a retired key, say) keeps its old key from being destroyed".into(),
                ),
                hint: Some(format!(
                    "find them with byok.data_key_references(dek_id), fix them, then CALL byok.respond_to_compromise('{tenant_id}', '{}') again",
                    response.new_master_key_id
                )),
            });
        }
        // Written meanwhile by a statement that began before the new key:
        // re-encrypt once more (the next call starts another job).
        Spi::run_with_args(
            "UPDATE byok.compromise_responses
                SET step = 'reencrypt', job_id = NULL,
                    report = pg_catalog.jsonb_set(report, '{verify_retry}', $2)
              WHERE response_id = $1",
            &[
                DatumWithOid::from(response.id),
                DatumWithOid::from(pgrx::JsonB(left.clone())),
            ],
        )?;
        audit_step(
            tenant_id,
            response.id,
            "verify_retry",
            serde_json::json!({"values_under_old_keys": left}),
        )?;
        return Ok("reencrypt");
    }
    let under_new = catalog::read_one::<i64>(
        "SELECT count(*) FROM byok.wrapped_data_keys
          WHERE tenant_id OPERATOR(pg_catalog.=) $1 AND state OPERATOR(pg_catalog.<>) 'destroyed'
            AND cmk_id OPERATOR(pg_catalog.<>) $2",
        &[
            DatumWithOid::from(tenant_id),
            DatumWithOid::from(response.new_master_key_id.as_str()),
        ],
    )?
    .unwrap_or(0);
    if under_new > 0 {
        return Err(ByokError::WrongState {
            message: format!(
                "{under_new} data key(s) of tenant \"{tenant_id}\" are not wrapped by master key \"{}\"",
                response.new_master_key_id
            ),
            detail: None,
            hint: Some("another rotation ran meanwhile; CALL the procedure again".into()),
        });
    }
    advance(
        tenant_id,
        response,
        serde_json::json!({"old_data_keys_sealing_values": 0, "unregistered_columns": 0}),
    )
}

/// How long verification waits for transactions older than the new data key.
const WAIT_FOR_OLDER: std::time::Duration = std::time::Duration::from_secs(600);

/// Columns the registry does not know could hold values under the old keys.
/// A plain `byok.encrypted` column of a table (or materialized view) is
/// counted, as its owner; one of a type built on it (a domain, an array)
/// cannot be, and is refused. (Partitions are covered by their parent;
/// temporary tables end with their sessions.)
fn check_unregistered_columns(tenant_id: &str, response: &Response) -> Result<(), ByokError> {
    let found: Vec<(pg_sys::Oid, String, String, bool)> = Spi::connect(|client| {
        let rows = client.select(
            // Every type that holds a byok.encrypted: arrays, domains (of
            // domains), composite types with such a field, and so on.
            "WITH RECURSIVE holding(oid) AS (
                 SELECT 'byok.encrypted'::pg_catalog.regtype::pg_catalog.oid
                 UNION
                 SELECT ty.oid FROM pg_catalog.pg_type ty, holding h
                  WHERE ty.typelem OPERATOR(pg_catalog.=) h.oid
                     OR ty.typbasetype OPERATOR(pg_catalog.=) h.oid
                     OR (ty.typrelid OPERATOR(pg_catalog.<>) 0
                         AND EXISTS (SELECT 1 FROM pg_catalog.pg_attribute f
                                      WHERE f.attrelid OPERATOR(pg_catalog.=) ty.typrelid
                                        AND f.atttypid OPERATOR(pg_catalog.=) h.oid
                                        AND NOT f.attisdropped)))
             SELECT c.oid,
                    pg_catalog.quote_ident(n.nspname) OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(c.relname),
                    a.attname::pg_catalog.text,
                    a.atttypid OPERATOR(pg_catalog.=) 'byok.encrypted'::pg_catalog.regtype
               FROM pg_catalog.pg_attribute a
               JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) a.attrelid
               JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
              WHERE a.atttypid IN (SELECT oid FROM holding)
                AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
                AND c.relkind IN ('r', 'p', 'm') AND NOT c.relispartition
                AND c.relpersistence OPERATOR(pg_catalog.<>) 't'
                AND NOT EXISTS (SELECT 1 FROM byok.protected_column_registry r
                                 WHERE r.relid::pg_catalog.oid OPERATOR(pg_catalog.=) a.attrelid
                                   AND r.attnum OPERATOR(pg_catalog.=) a.attnum)
              ORDER BY 2, 3",
            None,
            &[],
        )?;
        let mut out = Vec::new();
        for row in rows {
            out.push((
                row.required::<pg_sys::Oid>(1)?,
                row.required::<String>(2)?,
                row.required::<String>(3)?,
                row.required::<bool>(4)?,
            ));
        }
        Ok::<_, ByokError>(out)
    })?;
    let mut problems = Vec::new();
    for (relid, table, column, plain) in found {
        if !plain {
            problems.push(format!("{table}.{column} (a type built on byok.encrypted)"));
            continue;
        }
        let Some(owner) = crate::postgres::security::relation_owner(relid) else {
            continue; // dropped meanwhile
        };
        let target = crate::columns::Column {
            relid,
            table: table.clone(),
            column: column.clone(),
            context: String::new(),
            owner,
        };
        let values = crate::columns::count_in(
            &target,
            &crate::columns::under_keys("$col", "$1")?,
            &[DatumWithOid::from(response.old_data_keys.clone())],
        )?;
        if values > 0 {
            problems.push(format!(
                "{table}.{column} ({values} value(s) under an old key)"
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(ByokError::WrongState {
        message: format!(
            "the compromise response of tenant \"{tenant_id}\" cannot re-encrypt unregistered columns: {}",
            problems.join(", ")
        ),
        detail: Some(
            "their values are sealed under the old data keys, which the next steps destroy".into(),
        ),
        hint: Some(format!(
            "register them with byok.protect_column(table, column, tenant_column, context), then CALL byok.respond_to_compromise('{tenant_id}', '{}') again",
            response.new_master_key_id
        )),
    })
}

/// The end: the report, in the table and the audit trail.
fn finish(tenant_id: &str, response: &Response) -> Result<(), ByokError> {
    let report = Spi::get_one_with_args::<pgrx::JsonB>(
        "UPDATE byok.compromise_responses SET finished_at = pg_catalog.clock_timestamp()
          WHERE response_id = $1
         RETURNING report OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object(
                   'response_id', response_id, 'compromised_key_id', compromised_key_id,
                   'new_master_key_id', new_master_key_id, 'old_data_keys', old_data_keys,
                   'started_at', started_at, 'finished_at', finished_at,
                   'seconds', pg_catalog.round(extract(epoch FROM finished_at OPERATOR(pg_catalog.-) started_at)::pg_catalog.numeric, 1))",
        &[DatumWithOid::from(response.id)],
    )?
    .map(|j| j.0);
    catalog::audit(
        "compromise_response",
        Some(tenant_id),
        None,
        true,
        None,
        report,
    )
}
