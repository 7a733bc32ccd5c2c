//! The backend's side of the key broker: take a free slot, submit a request,
//! wake the broker, and sleep on the slot's condition variable until the answer
//! comes, `byok.kms_timeout_ms` passes, or the query is cancelled.
//!
//! Giving up is safe at any point: a [`Claim`] dropped while its request is
//! pending (timeout, cancel, `statement_timeout`, an error) returns the slot or
//! marks it abandoned, and a `before_shmem_exit` callback does the same when the
//! backend is terminated, so the broker frees the slot when its call ends and
//! no later request can receive the answer.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use byok_core::crypto::DataKey;
use byok_kms::protocol::{Request, Response};
use pgrx::pg_sys;

use super::shmem::{self, ABANDONED, BrokerShared, DONE, FILLING, FREE, RUNNING, SUBMITTED, Slot};
use crate::errors::ByokError;
use crate::gucs;

/// How long one sleep lasts before the waiter looks at the clock and the broker again.
const POLL: Duration = Duration::from_millis(100);

/// The answer to a request: the encoded response, and the plaintext key if any.
pub struct Answer {
    pub response: Response,
    pub data_key: Option<DataKey>,
}

/// Sends `request` to the broker and waits for its answer.
pub fn call(request: &Request) -> Result<Answer, ByokError> {
    let shared = shmem::shared().ok_or(ByokError::NotPreloaded)?;
    let encoded = serde_json::to_vec(request).map_err(|e| ByokError::Internal(e.to_string()))?;
    if encoded.len() > shmem::PAYLOAD_LEN {
        return Err(ByokError::InvalidArgument {
            message: format!("the key request is too large ({} bytes)", encoded.len()),
            hint: Some("shorten the tenant's provider options".into()),
        });
    }
    register_exit_callback();
    let timeout = Duration::from_millis(gucs::KMS_TIMEOUT_MS.get().max(1) as u64);
    let deadline = Instant::now() + timeout;

    let claim = Claim::take(shared, deadline, timeout)?;
    let slot = claim.slot;
    let request_id = shared.next_request_id.fetch_add(1, Ordering::AcqRel) + 1;
    unsafe { slot.payload()[..encoded.len()].copy_from_slice(&encoded) };
    slot.request_len
        .store(encoded.len() as u32, Ordering::Relaxed);
    slot.response_len.store(0, Ordering::Relaxed);
    slot.request_id.store(request_id, Ordering::Release);
    slot.state.store(SUBMITTED, Ordering::Release);
    wake_broker(shared);

    loop {
        if slot.state.load(Ordering::Acquire) == DONE {
            let answer = read_answer(shared, slot);
            claim.release();
            return answer;
        }
        let now = Instant::now();
        if now >= deadline {
            let broker_up = shared.broker_pid.load(Ordering::Acquire) != 0;
            return Err(ByokError::BrokerTimeout {
                timeout_ms: timeout.as_millis() as u64,
                broker_up,
            });
        }
        // Sleeps interruptibly: CHECK_FOR_INTERRUPTS runs inside, so a cancel or
        // statement_timeout raises an error here, and `claim` gives up the slot.
        unsafe {
            pg_sys::ConditionVariableTimedSleep(
                slot.cv.get(),
                (deadline - now).min(POLL).as_millis().max(1) as _,
                pg_sys::PG_WAIT_EXTENSION,
            );
        }
        // A broker that (re)started after we submitted finds the slot on its own;
        // waking it again costs nothing and covers a lost wake-up.
        wake_broker(shared);
    }
}

fn wake_broker(shared: &BrokerShared) {
    let latch = shared.broker_latch.load(Ordering::Acquire);
    if !latch.is_null() {
        unsafe { pg_sys::SetLatch(latch) };
    }
}

fn read_answer(shared: &BrokerShared, slot: &Slot) -> Result<Answer, ByokError> {
    let len = (slot.response_len.load(Ordering::Acquire) as usize).min(shmem::PAYLOAD_LEN);
    let response = serde_json::from_slice::<Response>(unsafe { &slot.payload()[..len] })
        .map_err(|e| ByokError::Internal(format!("malformed answer from the key broker: {e}")));
    let data_key = if slot.has_data_key.load(Ordering::Acquire) {
        Some(
            DataKey::from_slice(unsafe { &shared.slot_key(shared.slot_index(slot))[..] })
                .map_err(|e| ByokError::Internal(e.to_string()))?,
        )
    } else {
        None
    };
    Ok(Answer {
        response: response?,
        data_key,
    })
}

/// A slot this backend holds. Dropping it gives the slot up safely.
struct Claim {
    shared: &'static BrokerShared,
    slot: &'static Slot,
    released: bool,
}

impl Claim {
    /// A free slot, waiting (interruptibly) for one while all are busy.
    fn take(
        shared: &'static BrokerShared,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Claim, ByokError> {
        loop {
            for slot in shared.slots.iter() {
                if slot
                    .state
                    .compare_exchange(FREE, FILLING, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    // Owned from now on, so the exit callback finds it even mid-fill.
                    slot.owner_pid
                        .store(unsafe { pg_sys::MyProcPid }, Ordering::Release);
                    return Ok(Claim {
                        shared,
                        slot,
                        released: false,
                    });
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ByokError::BrokerBusy {
                    slots: shmem::SLOT_COUNT,
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            unsafe {
                pg_sys::ConditionVariableTimedSleep(
                    shared.slot_freed.get(),
                    (deadline - now)
                        .min(Duration::from_millis(10))
                        .as_millis()
                        .max(1) as _,
                    pg_sys::PG_WAIT_EXTENSION,
                );
            }
        }
    }

    /// After reading the answer: wipe it and free the slot.
    fn release(mut self) {
        self.shared.wipe_slot(self.shared.slot_index(self.slot));
        self.slot.state.store(FREE, Ordering::Release);
        unsafe { pg_sys::ConditionVariableBroadcast(self.shared.slot_freed.get()) };
        self.released = true;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.released {
            give_up(self.shared, self.slot);
        }
    }
}

/// Gives up a slot whatever its state: returns it if the broker has not taken the
/// request (or has answered it), marks it abandoned if the broker is working on it.
fn give_up(shared: &BrokerShared, slot: &Slot) {
    loop {
        let state = slot.state.load(Ordering::Acquire);
        let next = match state {
            FILLING | SUBMITTED | DONE => FREE,
            RUNNING => ABANDONED,
            _ => return,
        };
        if slot
            .state
            .compare_exchange(
                state,
                if next == FREE { FILLING } else { next },
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            if next == FREE {
                // Held as FILLING while wiping, so nobody takes it half-wiped.
                shared.wipe_slot(shared.slot_index(slot));
                slot.state.store(FREE, Ordering::Release);
                unsafe { pg_sys::ConditionVariableBroadcast(shared.slot_freed.get()) };
            }
            return;
        }
    }
}

static mut EXIT_CALLBACK_REGISTERED: bool = false;

/// On backend exit (including FATAL and pg_terminate_backend, which unwind no
/// Rust frames), give up every slot this process still holds.
fn register_exit_callback() {
    unsafe {
        if !EXIT_CALLBACK_REGISTERED {
            pg_sys::before_shmem_exit(Some(release_on_exit), pg_sys::Datum::from(0));
            EXIT_CALLBACK_REGISTERED = true;
        }
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn release_on_exit(_code: i32, _arg: pg_sys::Datum) {
    let Some(shared) = shmem::shared() else {
        return;
    };
    let me = unsafe { pg_sys::MyProcPid };
    for slot in shared.slots.iter() {
        let state = slot.state.load(Ordering::Acquire);
        if state != FREE && state != ABANDONED && slot.owner_pid.load(Ordering::Relaxed) == me {
            give_up(shared, slot);
        }
    }
}
