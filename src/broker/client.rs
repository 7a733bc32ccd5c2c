//! The backend's side of the key broker: claim a slot, submit a request, wake
//! the broker, and sleep on the slot's condition variable until the answer
//! comes, `byok.kms_timeout_ms` passes, or the query is cancelled.
//!
//! Giving up is safe at any point: a claim dropped while its request is pending
//! (timeout, cancel, `statement_timeout`, an error) frees the slot or marks it
//! abandoned ([`byok_core::slots`]), and a `before_shmem_exit` callback does the
//! same when the backend is terminated, so no later request can receive the
//! answer.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use byok_core::crypto::DataKey;
use byok_core::slots::Claim;
use byok_kms::protocol::{Request, Response};
use pgrx::pg_sys;

use crate::errors::ByokError;
use crate::gucs;
use crate::shmem::{self, SLOT_COUNT, Shared};

/// How long one sleep lasts before the waiter looks at the clock and the broker again.
const POLL: Duration = Duration::from_millis(100);

/// The answer to a request: the decoded response, and the plaintext key if any.
pub struct Answer {
    pub response: Response,
    pub data_key: Option<DataKey>,
}

/// Sends `request` to the broker and waits for its answer.
pub fn call(request: &Request) -> Result<Answer, ByokError> {
    let shared = shmem::shared().ok_or(ByokError::NotPreloaded)?;
    let encoded = serde_json::to_vec(request).map_err(|e| ByokError::Internal(e.to_string()))?;
    register_exit_callback();
    let timeout = Duration::from_millis(gucs::kms_timeout_ms());
    let deadline = Instant::now() + timeout;

    let mut claim = claim_slot(shared, deadline, timeout)?;
    claim
        .submit(&encoded)
        .map_err(|e| ByokError::InvalidArgument {
            message: e.to_string(),
            hint: Some("shorten the tenant's provider options".into()),
        })?;
    shared.wake_broker();
    let answer = wait_for_answer(shared, claim, deadline, timeout);
    shmem::stop_waiting();
    answer
}

fn wait_for_answer(
    shared: &'static Shared,
    claim: Claim<'static, SLOT_COUNT>,
    deadline: Instant,
    timeout: Duration,
) -> Result<Answer, ByokError> {
    loop {
        if claim.answered() {
            let answer = claim
                .take_answer()
                .ok_or_else(|| ByokError::Internal("the key broker's answer vanished".into()))?;
            let response = serde_json::from_slice::<Response>(&answer.response).map_err(|e| {
                ByokError::Internal(format!("malformed answer from the key broker: {e}"))
            })?;
            return Ok(Answer {
                response,
                data_key: answer.key,
            });
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(ByokError::BrokerTimeout {
                timeout_ms: timeout.as_millis() as u64,
                broker_up: shared.broker_pid.load(Ordering::Acquire) != 0,
            });
        }
        // A cancel or statement_timeout raises its error from inside the sleep;
        // `claim` then gives the slot up as it drops.
        shared.sleep_until_answered(claim.index(), (deadline - now).min(POLL));
        // A broker that (re)started after we submitted finds the slot on its own;
        // waking it again costs nothing and covers a lost wake-up.
        shared.wake_broker();
    }
}

/// A free slot, waiting (interruptibly) for one while all are busy.
fn claim_slot(
    shared: &'static Shared,
    deadline: Instant,
    timeout: Duration,
) -> Result<Claim<'static, SLOT_COUNT>, ByokError> {
    // SAFETY: reads this backend's pid.
    let pid = unsafe { pg_sys::MyProcPid };
    loop {
        if let Some(claim) = shared.slots.claim(pid, shared) {
            return Ok(claim);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(ByokError::BrokerBusy {
                slots: SLOT_COUNT,
                timeout_ms: timeout.as_millis() as u64,
            });
        }
        shared.sleep_until_slot_freed((deadline - now).min(Duration::from_millis(10)));
    }
}

static mut EXIT_CALLBACK_REGISTERED: bool = false;

/// On backend exit (including FATAL and pg_terminate_backend, which unwind no
/// Rust frames), give up every slot this process still holds.
fn register_exit_callback() {
    // SAFETY: backends are single-threaded; the flag is only touched here.
    unsafe {
        if !EXIT_CALLBACK_REGISTERED {
            pg_sys::before_shmem_exit(Some(release_on_exit), pg_sys::Datum::from(0));
            EXIT_CALLBACK_REGISTERED = true;
        }
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn release_on_exit(_code: i32, _arg: pg_sys::Datum) {
    if let Some(shared) = shmem::shared() {
        // SAFETY: reads this backend's pid.
        let pid = unsafe { pg_sys::MyProcPid };
        shared.slots.release_owned_by(pid, shared);
    }
}
