//! `byok.tenant` on Citus: a distributed query may start only where the
//! restriction in force is the one Citus carried to the worker nodes.
//!
//! The shards' part of a distributed query (and so each `byok.decrypt` pushed
//! down with it) runs in backends on the worker nodes, which see only what
//! Citus sends them: the `SET LOCAL` statements of the current transaction
//! block, when `citus.propagate_set_commands = 'local'`. A session-level
//! `SET byok.tenant`, `set_config(...)`, a role's default or a connection
//! option stays on this node, and the workers would decrypt without the
//! restriction. So this module follows which value Citus carried in the
//! current transaction (a `SET LOCAL byok.tenant` passing through
//! ProcessUtility inside a transaction block) and refuses to start a plan
//! holding a Citus scan while `byok.tenant` restricts the session to a tenant
//! the workers were not told about.
//!
//! What it follows is a subset of what Citus carries, never more: Citus also
//! carries `SET LOCAL` run in a `DO` block or procedure outside `BEGIN`, which
//! this module does not count, so such a session is refused (fails closed).
//! When a subtransaction rolls back, what it carried is forgotten (so it is
//! on the workers); when one commits, the connections opened meanwhile keep
//! its `SET LOCAL`s and new ones do not get them, so nothing counts as carried
//! until the next `SET LOCAL`. Citus sends a `SET` as the whole query string
//! it came in, and the workers parse it with `standard_conforming_strings`
//! on: a `SET` sharing its string with other statements, or parsed here with
//! it off, counts as carrying no tenant. Reads in a transaction block reach
//! the workers inside one (with the `SET LOCAL`s) only while
//! `citus.select_opens_transaction_block` is on, so it must be. The check
//! runs when a plan starts and on every run (a cursor's `FETCH`).
//!
//! Citus also runs a distributed procedure's `CALL` on a worker by itself
//! outside a transaction block; that is refused the same way.
//!
//! Not covered, as the session chooses them as it could `RESET byok.tenant`:
//! statements it sends to the workers itself (`run_command_on_shards` and its
//! kind) and expressions in DDL Citus propagates to the shards.

use std::cell::RefCell;
use std::ffi::{CStr, c_char, c_int};

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;

use crate::catalog;
use crate::errors::ByokError;
use crate::gucs;
use crate::postgres::security;

const TENANT_SETTING: &str = "byok.tenant";

thread_local! {
    /// The values of `byok.tenant` Citus carried to the workers in this
    /// transaction, each with the subtransaction it was set in; the last one
    /// is in force there. `None`: the workers use their own default.
    static CARRIED: RefCell<Vec<(pg_sys::SubTransactionId, Option<String>)>> =
        const { RefCell::new(Vec::new()) };
}

static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;
static mut PREV_EXECUTOR_START: pg_sys::ExecutorStart_hook_type = None;
static mut PREV_EXECUTOR_RUN: pg_sys::ExecutorRun_hook_type = None;

/// Installs the two hooks and the transaction callbacks. From `_PG_init`.
pub fn install_hooks() {
    // SAFETY: `_PG_init` runs once per process, single-threaded, before any
    // hook can be called; chaining keeps other libraries' hooks (Citus's)
    // working.
    unsafe {
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
        PREV_EXECUTOR_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
        PREV_EXECUTOR_RUN = pg_sys::ExecutorRun_hook;
        pg_sys::ExecutorRun_hook = Some(executor_run);
        pg_sys::RegisterXactCallback(Some(at_transaction_end), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(at_subtransaction_end), std::ptr::null_mut());
    }
}

/// Whether Citus sends the `SET` statement about to run to the workers: in a
/// transaction block, with `citus.propagate_set_commands = 'local'` as it
/// stands before the statement (Citus sends it before running it here, so a
/// `RESET ALL` that turns propagation off is still sent).
fn citus_sends_set() -> bool {
    // SAFETY: a plain read of backend state, on its main thread.
    let in_block = unsafe { pg_sys::IsTransactionBlock() };
    in_block && citus_setting_is(c"citus.propagate_set_commands", b"local")
}

/// Whether the workers parse a `SET` Citus sends them as this node did:
/// Citus sends the whole query string the statement came in, so it must hold
/// nothing else, and the workers read it with `standard_conforming_strings`
/// on, so it must be on here. In a backend Citus opened for a coordinator's
/// transaction, the string is Citus's own (`BEGIN; SET LOCAL ...; ...`),
/// already checked there.
///
/// # Safety
/// `pstmt` is a live planned statement and `query_string` its source text or NULL.
unsafe fn parsed_alike(pstmt: *const pg_sys::PlannedStmt, query_string: *const c_char) -> bool {
    if !citus_setting_is(c"standard_conforming_strings", b"on") {
        return false;
    }
    // SAFETY: as the caller promises.
    let whole = unsafe { is_whole_string(pstmt, query_string) };
    whole || citus_internal_backend()
}

/// Whether this backend is one Citus opened from another node (its
/// `application_name`). A session can claim it, but it can as well lift
/// `byok.tenant` itself: the guard is against mistakes, not the session.
fn citus_internal_backend() -> bool {
    // SAFETY: a plain read of a setting, as in `citus_setting_is`.
    unsafe {
        let name = pg_sys::GetConfigOption(c"application_name".as_ptr(), true, false);
        !name.is_null()
            && CStr::from_ptr(name)
                .to_bytes()
                .starts_with(b"citus_internal gpid=")
    }
}

/// What a `SET` statement Citus sent leaves of `byok.tenant` on the workers,
/// read after it ran here: `Some(Some(tenant))`, `Some(None)` (their default,
/// or not known), or `None` (it leaves byok.tenant as it was).
///
/// # Safety
/// `stmt` is a live `VariableSetStmt`.
unsafe fn left_by(
    stmt: *const pg_sys::VariableSetStmt,
    parsed_alike: bool,
) -> Option<Option<String>> {
    use pg_sys::VariableSetKind::*;
    if !parsed_alike {
        return Some(None);
    }
    // SAFETY: the caller passes a live node; `name` may be NULL (RESET ALL).
    let (kind, is_local, name) = unsafe {
        let name = (*stmt).name;
        let name = (!name.is_null()).then(|| CStr::from_ptr(name));
        ((*stmt).kind, (*stmt).is_local, name)
    };
    let names_tenant =
        name.is_some_and(|n| n.to_bytes().eq_ignore_ascii_case(TENANT_SETTING.as_bytes()));
    match kind {
        // The value just set, read back (an empty one restricts nothing).
        VAR_SET_VALUE if is_local && names_tenant => {
            Some(gucs::session_tenant().map(|t| t.to_string_lossy().into_owned()))
        }
        // Sent as written: each worker takes its own current or default value.
        VAR_SET_CURRENT | VAR_SET_DEFAULT if is_local && names_tenant => Some(None),
        VAR_RESET if names_tenant => Some(None),
        VAR_RESET_ALL => Some(None),
        // Other settings' SET LOCAL, RESET and SET TRANSACTION, and a
        // session-level SET (which Citus does not send).
        _ => None,
    }
}

#[pgrx::pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: the executor passes a live statement; the hooks chained are
    // PostgreSQL's and other libraries', called with the arguments received.
    unsafe {
        let stmt = (*pstmt).utilityStmt;
        let tag = if stmt.is_null() {
            pg_sys::NodeTag::T_Invalid
        } else {
            (*stmt).type_
        };
        if tag == pg_sys::NodeTag::T_CallStmt
            && context == pg_sys::ProcessUtilityContext::PROCESS_UTILITY_TOPLEVEL
            && let Some(tenant) = gucs::session_tenant()
            && !security::in_catalog_work()
            && !carried(tenant)
            && calls_distributed_procedure(stmt.cast())
        {
            ByokError::TenantNotCarriedToWorkers.raise();
        }
        // (decided before the statement runs, as Citus decides)
        let sent_as = (tag == pg_sys::NodeTag::T_VariableSetStmt && citus_sends_set())
            .then(|| parsed_alike(pstmt, query_string));
        match PREV_PROCESS_UTILITY {
            Some(prev) => prev(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
            None => pg_sys::standard_ProcessUtility(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
        }
        // After the statement: Citus has sent it (or failed, and this is not reached).
        if let Some(parsed_alike) = sent_as
            && let Some(value) = left_by(stmt.cast(), parsed_alike)
        {
            let level = pg_sys::GetCurrentSubTransactionId();
            CARRIED.with_borrow_mut(|carried| carried.push((level, value)));
        }
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn executor_start(query_desc: *mut pg_sys::QueryDesc, eflags: c_int) {
    // SAFETY: the executor passes a live query description; chained as above.
    unsafe {
        if eflags & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as c_int == 0 {
            refuse_unless_carried(query_desc);
        }
        match PREV_EXECUTOR_START {
            Some(prev) => prev(query_desc, eflags),
            None => pg_sys::standard_ExecutorStart(query_desc, eflags),
        }
    }
}

/// Checked again on every run: Citus sends a statement's tasks when it first
/// runs, and a cursor declared before `byok.tenant` was set runs after.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn executor_run(
    query_desc: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
    execute_once: bool,
) {
    // SAFETY: the executor passes a live, started query description; chained as above.
    unsafe {
        refuse_unless_carried(query_desc);
        match PREV_EXECUTOR_RUN {
            Some(prev) => prev(query_desc, direction, count, execute_once),
            None => pg_sys::standard_ExecutorRun(query_desc, direction, count, execute_once),
        }
    }
}

/// Raises [`ByokError::TenantNotCarriedToWorkers`] when `byok.tenant`
/// restricts this session and the statement runs on Citus without the
/// workers restricted alike.
///
/// # Safety
/// `query_desc` is a live query description.
unsafe fn refuse_unless_carried(query_desc: *const pg_sys::QueryDesc) {
    if let Some(tenant) = gucs::session_tenant()
        && !security::in_catalog_work()
        // SAFETY: as the caller promises.
        && unsafe { runs_on_citus((*query_desc).plannedstmt) }
        && !(carried(tenant) && citus_setting_is(c"citus.select_opens_transaction_block", b"on"))
    {
        ByokError::TenantNotCarriedToWorkers.raise();
    }
}

/// Whether a Citus setting (absent without Citus) has this value.
fn citus_setting_is(name: &CStr, value: &[u8]) -> bool {
    // SAFETY: a plain read of a setting on the backend's main thread; the
    // string returned stays valid until the next change of the setting.
    unsafe {
        let current = pg_sys::GetConfigOption(name.as_ptr(), true, false);
        !current.is_null()
            && CStr::from_ptr(current)
                .to_bytes()
                .eq_ignore_ascii_case(value)
    }
}

/// Whether a statement is all of its query string (but for blanks and `;`).
///
/// # Safety
/// `pstmt` is a live planned statement and `query_string` its source text or NULL.
unsafe fn is_whole_string(pstmt: *const pg_sys::PlannedStmt, query_string: *const c_char) -> bool {
    if query_string.is_null() {
        return false;
    }
    // SAFETY: the caller passes live pointers; the source text is a C string.
    let (text, location, length) = unsafe {
        (
            CStr::from_ptr(query_string).to_bytes(),
            (*pstmt).stmt_location,
            (*pstmt).stmt_len,
        )
    };
    let Ok(start) = usize::try_from(location) else {
        return false;
    };
    // (a length of 0 means "to the end of the string")
    let end = match usize::try_from(length) {
        Ok(0) => text.len(),
        Ok(length) => start.saturating_add(length).min(text.len()),
        Err(_) => return false,
    };
    let blank = |part: &[u8]| part.iter().all(|b| b.is_ascii_whitespace() || *b == b';');
    start <= end && blank(&text[..start]) && blank(&text[end..])
}

/// Whether a `CALL` names a procedure Citus distributed (one it may run on a
/// worker by itself). Read as the caller: Citus lets everyone read
/// `pg_dist_object`.
///
/// # Safety
/// `call` is a live, analysed `CallStmt`.
unsafe fn calls_distributed_procedure(call: *const pg_sys::CallStmt) -> bool {
    // SAFETY: an analysed CALL holds its function expression.
    let procedure = unsafe {
        let expr = (*call).funcexpr;
        if expr.is_null() {
            return false;
        }
        (*expr).funcid
    };
    // (asked by name first: the table exists only where Citus is installed)
    let citus = "SELECT pg_catalog.to_regclass('pg_catalog.pg_dist_object') IS NOT NULL";
    let distributed = "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_object o
                         WHERE o.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
                           AND o.objid OPERATOR(pg_catalog.=) $1
                           AND o.colocationid IS NOT NULL)";
    let answer = catalog::read_one::<bool>(citus, &[]).and_then(|citus| match citus {
        Some(true) => catalog::read_one::<bool>(distributed, &[DatumWithOid::from(procedure)]),
        _ => Ok(Some(false)),
    });
    match answer {
        Ok(distributed) => distributed.unwrap_or(false),
        // Not knowing is not a reason to let the call reach a worker.
        Err(_) => true,
    }
}

/// Whether Citus last carried `tenant` to the workers in this transaction.
fn carried(tenant: &CStr) -> bool {
    CARRIED.with_borrow(|carried| {
        matches!(carried.last(), Some((_, Some(value))) if value.as_bytes() == tenant.to_bytes())
    })
}

/// Whether a plan holds a Citus scan (its name starts with "Citus": the
/// adaptive executor, INSERT ... SELECT, MERGE), here or in a subplan.
///
/// # Safety
/// `stmt` is a live planned statement.
unsafe fn runs_on_citus(stmt: *const pg_sys::PlannedStmt) -> bool {
    // SAFETY: the caller passes a live planned statement; its lists hold plans.
    unsafe {
        !stmt.is_null()
            && (holds_citus_scan((*stmt).planTree)
                || list_items((*stmt).subplans).any(|plan| holds_citus_scan(plan.cast())))
    }
}

/// # Safety
/// `plan` is NULL or a live plan tree.
unsafe fn holds_citus_scan(plan: *const pg_sys::Plan) -> bool {
    use pg_sys::NodeTag::*;
    if plan.is_null() {
        return false;
    }
    // SAFETY: each node is cast to the struct its tag names; child lists hold plans.
    unsafe {
        let children = match (*plan).type_ {
            T_CustomScan => {
                let scan = plan.cast::<pg_sys::CustomScan>();
                let methods = (*scan).methods;
                if !methods.is_null()
                    && !(*methods).CustomName.is_null()
                    && CStr::from_ptr((*methods).CustomName)
                        .to_bytes()
                        .starts_with(b"Citus")
                {
                    return true;
                }
                (*scan).custom_plans
            }
            T_Append => (*plan.cast::<pg_sys::Append>()).appendplans,
            T_MergeAppend => (*plan.cast::<pg_sys::MergeAppend>()).mergeplans,
            T_BitmapAnd => (*plan.cast::<pg_sys::BitmapAnd>()).bitmapplans,
            T_BitmapOr => (*plan.cast::<pg_sys::BitmapOr>()).bitmapplans,
            T_SubqueryScan => {
                return holds_citus_scan((*plan.cast::<pg_sys::SubqueryScan>()).subplan);
            }
            _ => std::ptr::null_mut(),
        };
        holds_citus_scan((*plan).lefttree)
            || holds_citus_scan((*plan).righttree)
            || list_items(children).any(|child| holds_citus_scan(child.cast()))
    }
}

/// The pointers a `List` holds (none for NIL).
///
/// # Safety
/// `list` is NIL or a live pointer list.
unsafe fn list_items(list: *const pg_sys::List) -> impl Iterator<Item = *mut std::ffi::c_void> {
    // SAFETY: a live list has `length` cells in `elements`.
    let cells: &[pg_sys::ListCell] = unsafe {
        if list.is_null() {
            &[]
        } else {
            std::slice::from_raw_parts((*list).elements, (*list).length as usize)
        }
    };
    // SAFETY: a pointer list's cells hold pointers.
    cells.iter().map(|cell| unsafe { cell.ptr_value })
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn at_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    if matches!(
        event,
        XACT_EVENT_COMMIT
            | XACT_EVENT_ABORT
            | XACT_EVENT_PREPARE
            | XACT_EVENT_PARALLEL_COMMIT
            | XACT_EVENT_PARALLEL_ABORT
    ) {
        CARRIED.with_borrow_mut(Vec::clear);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn at_subtransaction_end(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    // Subtransaction ids grow within a transaction: what this one and its
    // children carried has ids at least its own.
    let ended = |carried: &mut Vec<(pg_sys::SubTransactionId, Option<String>)>| {
        let before = carried.len();
        carried.retain(|(level, _)| *level < my_subid);
        carried.len() < before
    };
    match event {
        // Rolled back on the workers' open connections too (Citus sends
        // ROLLBACK TO SAVEPOINT), and never sent to new ones.
        SUBXACT_EVENT_ABORT_SUB => {
            CARRIED.with_borrow_mut(|carried| ended(carried));
        }
        // Kept on the connections open meanwhile, never sent to new ones: the
        // workers may differ, so nothing counts as carried until the next SET.
        SUBXACT_EVENT_COMMIT_SUB => CARRIED.with_borrow_mut(|carried| {
            if ended(carried) {
                carried.push((parent, None));
            }
        }),
        _ => {}
    }
}
