//! The request-slot protocol between backends and the key broker, as a type.
//!
//! A backend claims a free slot, writes its request and submits it; the broker
//! takes it, works on it (off the slot) and answers; the backend reads the
//! answer and frees the slot. Each state change is made by one party only:
//!
//! ```text
//! Free --backend claim--> Filling --backend submit--> Submitted --broker take--> Running
//! Running --broker answer--> Done --backend take_answer--> Free
//! Filling | Submitted | Done --backend gives up--> Free
//! Running --backend gives up--> Abandoned --broker answer (or restart)--> Free
//! ```
//!
//! The broker writes an answer only while the slot's request id is the one it
//! took, and a backend that gave up never reads one, so an answer never
//! reaches the next user of the slot. Every path that frees a slot goes through
//! [`SlotTable::free`], which wipes the payload and the plaintext key first and
//! then wakes whoever waits for a free slot.
//!
//! The table lives in PostgreSQL shared memory in the extension (all-zero bytes
//! are a valid empty table); waking is delegated to a [`Signals`]
//! implementation (condition variables there, nothing in the tests here).

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};

use crate::crypto::DataKey;

/// Room for one encoded request or answer.
pub const PAYLOAD_LEN: usize = 16 * 1024;
/// A plaintext data key.
pub const KEY_LEN: usize = crate::crypto::DEK_LEN;

/// Where a slot is in its round trip.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    Free = 0,
    Filling = 1,
    Submitted = 2,
    Running = 3,
    Done = 4,
    Abandoned = 5,
}

impl SlotState {
    fn from_raw(raw: u32) -> SlotState {
        match raw {
            0 => SlotState::Free,
            1 => SlotState::Filling,
            2 => SlotState::Submitted,
            3 => SlotState::Running,
            4 => SlotState::Done,
            // Only the values above are ever stored.
            _ => SlotState::Abandoned,
        }
    }
}

/// Who to wake after a change: the host process's waiting mechanism.
pub trait Signals {
    /// The requester of slot `index` may find its answer now.
    fn answered(&self, index: usize);
    /// A slot became free.
    fn slot_freed(&self);
}

/// A request that does not fit in a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the key request is too large ({len} bytes, at most {PAYLOAD_LEN})")]
pub struct TooLarge {
    pub len: usize,
}

#[repr(C)]
struct Slot {
    state: AtomicU32,
    request_id: AtomicU64,
    owner_pid: AtomicI32,
    request_len: AtomicU32,
    response_len: AtomicU32,
    has_key: AtomicBool,
    payload: UnsafeCell<[u8; PAYLOAD_LEN]>,
}

impl Slot {
    fn state(&self) -> SlotState {
        SlotState::from_raw(self.state.load(Ordering::Acquire))
    }

    fn set(&self, state: SlotState) {
        self.state.store(state as u32, Ordering::Release);
    }

    fn change(&self, from: SlotState, to: SlotState) -> bool {
        self.state
            .compare_exchange(from as u32, to as u32, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// The plaintext keys of the slots' answers, apart from everything else so the
/// host can keep their pages out of core dumps ([`SlotTable::key_region`]).
#[repr(C)]
struct SlotKeys<const N: usize>([UnsafeCell<[u8; KEY_LEN]>; N]);

/// `N` request slots.
#[repr(C)]
pub struct SlotTable<const N: usize> {
    next_request_id: AtomicU64,
    slots: [Slot; N],
    keys: SlotKeys<N>,
}

// SAFETY: the non-`Sync` fields are each slot's `payload` and key buffer
// (`UnsafeCell`s). Their owner is fixed by the slot's state, and a party
// touches them only in a state it entered, or was handed, by an atomic change
// of that state: Filling (entered by the claiming backend's swap from Free,
// or its own swap from Submitted/Done when giving up) and Done belong to the
// backend holding the claim; Running and Abandoned to the broker, which took
// the request with the swap Submitted -> Running; Submitted to no one (it is
// left only by one of those two swaps). Each hand-over is a Release store or AcqRel
// swap that the receiver's Acquire load or swap sees, so the buffer accesses
// of two parties never overlap, whether threads or processes share the table.
// Every other field is an atomic.
unsafe impl<const N: usize> Sync for SlotTable<N> {}

/// A request the broker took: it answers it with [`SlotTable::answer`].
#[derive(Debug)]
pub struct Taken {
    pub index: usize,
    pub request_id: u64,
    pub request: Vec<u8>,
}

impl<const N: usize> SlotTable<N> {
    /// A zeroed table on the heap (in the extension it is placed, zeroed, in
    /// shared memory instead).
    pub fn new_boxed() -> Box<Self> {
        // SAFETY: every field is an integer atomic, an `AtomicBool`, a byte
        // array in an `UnsafeCell`, or an array of those, and all-zero bytes are
        // a valid value of each (the empty table: every slot Free, no key).
        unsafe { Box::new_zeroed().assume_init() }
    }

    /// The address range of the plaintext-key fields.
    pub fn key_region(&self) -> (usize, usize) {
        let start = std::ptr::from_ref(&self.keys) as usize;
        (start, std::mem::size_of::<SlotKeys<N>>())
    }

    pub fn state(&self, index: usize) -> SlotState {
        self.slots[index].state()
    }

    /// Slots not free.
    pub fn busy(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.state() != SlotState::Free)
            .count()
    }

    /// Claims a free slot for process `pid`, or `None` while all are busy.
    pub fn claim<'a>(&'a self, pid: i32, signals: &'a dyn Signals) -> Option<Claim<'a, N>> {
        let index = self
            .slots
            .iter()
            .position(|s| s.change(SlotState::Free, SlotState::Filling))?;
        // Owned from now on, so `release_owned_by` finds it even mid-fill.
        self.slots[index].owner_pid.store(pid, Ordering::Release);
        Some(Claim {
            table: self,
            signals,
            index,
            done: false,
        })
    }

    /// Takes the request in slot `index` if one was submitted there.
    pub fn take(&self, index: usize) -> Option<Taken> {
        let slot = &self.slots[index];
        if !slot.change(SlotState::Submitted, SlotState::Running) {
            return None;
        }
        let request_id = slot.request_id.load(Ordering::Acquire);
        let len = (slot.request_len.load(Ordering::Acquire) as usize).min(PAYLOAD_LEN);
        // SAFETY: our swap Submitted -> Running succeeded, so the broker (this
        // caller) owns the payload; the backend wrote it while Filling and
        // published it with its Release store of Submitted, which the swap
        // acquired. `len` is capped at PAYLOAD_LEN.
        let request = unsafe { (&*slot.payload.get())[..len].to_vec() };
        Some(Taken {
            index,
            request_id,
            request,
        })
    }

    /// Answers request `request_id` in slot `index`, if the slot still waits
    /// for it; an answer to a request its backend gave up is wiped instead.
    /// `response` longer than a slot is replaced by `too_large`.
    pub fn answer(
        &self,
        index: usize,
        request_id: u64,
        response: &[u8],
        key: Option<&DataKey>,
        signals: &dyn Signals,
    ) {
        let slot = &self.slots[index];
        if slot.request_id.load(Ordering::Acquire) != request_id {
            return;
        }
        match slot.state() {
            SlotState::Running => {}
            SlotState::Abandoned => return self.free(index, SlotState::Abandoned, signals),
            _ => return,
        }
        self.write_answer(index, response, key);
        if slot.change(SlotState::Running, SlotState::Done) {
            signals.answered(index);
        } else {
            // The requester gave up meanwhile: nobody may read this answer.
            self.free(index, SlotState::Abandoned, signals);
        }
    }

    fn write_answer(&self, index: usize, response: &[u8], key: Option<&DataKey>) {
        let slot = &self.slots[index];
        let len = response.len().min(PAYLOAD_LEN);
        // SAFETY: only `answer` calls this, after seeing the slot Running with
        // the request id the broker took. From Running the backend can only
        // move it to Abandoned, and an Abandoned slot's buffers still belong to
        // the broker (only it frees such a slot), so no one else reads or
        // writes them now. `len <= PAYLOAD_LEN`; a key is exactly KEY_LEN bytes.
        unsafe {
            (&mut *slot.payload.get())[..len].copy_from_slice(&response[..len]);
            if let Some(key) = key {
                (*self.keys.0[index].get()).copy_from_slice(key.expose());
                slot.has_key.store(true, Ordering::Relaxed);
            }
        }
        slot.response_len.store(len as u32, Ordering::Release);
    }

    /// After a broker restart: requests the previous broker had taken are
    /// answered with `restarted` (it will never answer them); abandoned slots
    /// are freed.
    pub fn recover(&self, restarted: &[u8], signals: &dyn Signals) {
        for index in 0..N {
            match self.slots[index].state() {
                SlotState::Running => {
                    let request_id = self.slots[index].request_id.load(Ordering::Acquire);
                    self.answer(index, request_id, restarted, None, signals);
                }
                SlotState::Abandoned => self.free(index, SlotState::Abandoned, signals),
                _ => {}
            }
        }
    }

    /// Gives up every slot process `pid` holds (its exit callback).
    pub fn release_owned_by(&self, pid: i32, signals: &dyn Signals) {
        for index in 0..N {
            let state = self.slots[index].state();
            if state != SlotState::Free
                && state != SlotState::Abandoned
                && self.slots[index].owner_pid.load(Ordering::Acquire) == pid
            {
                self.give_up(index, signals);
            }
        }
    }

    /// Gives slot `index` up whatever its state: frees it if the broker has not
    /// taken the request (or has answered it), marks it abandoned if the broker
    /// is working on it.
    fn give_up(&self, index: usize, signals: &dyn Signals) {
        loop {
            let state = self.slots[index].state();
            match state {
                SlotState::Filling | SlotState::Submitted | SlotState::Done => {
                    // Held as Filling while wiping, so nobody takes it half-wiped.
                    if state == SlotState::Filling
                        || self.slots[index].change(state, SlotState::Filling)
                    {
                        return self.free(index, SlotState::Filling, signals);
                    }
                }
                SlotState::Running => {
                    if self.slots[index].change(SlotState::Running, SlotState::Abandoned) {
                        return;
                    }
                }
                SlotState::Free | SlotState::Abandoned => return,
            }
        }
    }

    /// The one way a slot becomes free: wipe the answer and the key, mark it
    /// free (if it is still in state `from`), wake waiters.
    fn free(&self, index: usize, from: SlotState, signals: &dyn Signals) {
        let slot = &self.slots[index];
        if slot.state() != from {
            return;
        }
        self.wipe(index);
        if slot.change(from, SlotState::Free) {
            signals.slot_freed();
        }
    }

    fn wipe(&self, index: usize) {
        let slot = &self.slots[index];
        let len = (slot.response_len.load(Ordering::Acquire) as usize)
            .max(slot.request_len.load(Ordering::Acquire) as usize)
            .min(PAYLOAD_LEN);
        // SAFETY: only `free` calls this, having just seen the slot in the
        // state `from` that its caller owns: Filling or Done (the backend, in
        // `give_up` or `take_answer`) or Abandoned (the broker, in `answer` or
        // `recover`); no other party touches the buffers of a slot in those
        // states until `free` marks it Free. Raw-pointer writes make no
        // reference; `len <= PAYLOAD_LEN`. The key is wiped with a volatile
        // write so that the compiler cannot drop it as a dead store.
        unsafe {
            std::ptr::write_bytes(slot.payload.get().cast::<u8>(), 0, len);
            std::ptr::write_volatile(self.keys.0[index].get(), [0u8; KEY_LEN]);
        }
        slot.has_key.store(false, Ordering::Relaxed);
        slot.request_len.store(0, Ordering::Relaxed);
        slot.response_len.store(0, Ordering::Relaxed);
        slot.owner_pid.store(0, Ordering::Relaxed);
    }
}

/// A slot a backend holds. Dropping it before [`Claim::take_answer`] gives the
/// slot up safely (frees it, or marks it abandoned while the broker works on it).
pub struct Claim<'a, const N: usize> {
    table: &'a SlotTable<N>,
    signals: &'a dyn Signals,
    index: usize,
    done: bool,
}

/// What the broker answered.
pub struct SlotAnswer {
    pub response: Vec<u8>,
    pub key: Option<DataKey>,
}

impl<const N: usize> Claim<'_, N> {
    pub fn index(&self) -> usize {
        self.index
    }

    /// Writes `request` and hands it to the broker; returns its request id.
    pub fn submit(&mut self, request: &[u8]) -> Result<u64, TooLarge> {
        if request.len() > PAYLOAD_LEN {
            return Err(TooLarge { len: request.len() });
        }
        let slot = &self.table.slots[self.index];
        let request_id = self.table.next_request_id.fetch_add(1, Ordering::AcqRel) + 1;
        // SAFETY: this `Claim` exists only for a slot its backend moved to
        // Filling (swap from Free in `claim`), and nothing else touches a Filling
        // slot's payload; `request.len() <= PAYLOAD_LEN` was checked above.
        unsafe { (&mut *slot.payload.get())[..request.len()].copy_from_slice(request) };
        slot.request_len
            .store(request.len() as u32, Ordering::Release);
        slot.response_len.store(0, Ordering::Release);
        slot.request_id.store(request_id, Ordering::Release);
        slot.set(SlotState::Submitted);
        Ok(request_id)
    }

    /// Whether the answer is there.
    pub fn answered(&self) -> bool {
        self.table.slots[self.index].state() == SlotState::Done
    }

    /// The answer (once [`answered`](Self::answered)); the slot is wiped and freed.
    pub fn take_answer(mut self) -> Option<SlotAnswer> {
        if !self.answered() {
            return None;
        }
        let slot = &self.table.slots[self.index];
        let len = (slot.response_len.load(Ordering::Acquire) as usize).min(PAYLOAD_LEN);
        // SAFETY: the slot is Done (just checked by `answered`, an Acquire load
        // that saw the broker's AcqRel swap Running -> Done made after writing
        // the answer), and a Done slot's buffers belong to the backend that
        // holds this `Claim`: the broker never touches it again. `len` is capped
        // at PAYLOAD_LEN.
        let (response, key) = unsafe {
            let response = (&*slot.payload.get())[..len].to_vec();
            let key = slot
                .has_key
                .load(Ordering::Acquire)
                .then(|| DataKey::from_bytes(&*self.table.keys.0[self.index].get()));
            (response, key)
        };
        self.done = true;
        self.table.free(self.index, SlotState::Done, self.signals);
        Some(SlotAnswer { response, key })
    }
}

impl<const N: usize> Drop for Claim<'_, N> {
    fn drop(&mut self) {
        if !self.done {
            self.table.give_up(self.index, self.signals);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    #[derive(Default)]
    struct Counting {
        answered: AtomicUsize,
        freed: AtomicUsize,
    }

    impl Signals for Counting {
        fn answered(&self, _index: usize) {
            self.answered.fetch_add(1, Ordering::Relaxed);
        }
        fn slot_freed(&self) {
            self.freed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn key(byte: u8) -> DataKey {
        DataKey::from_slice(&[byte; KEY_LEN]).unwrap()
    }

    #[test]
    fn one_round_trip() {
        let table = SlotTable::<4>::new_boxed();
        let signals = Counting::default();
        let mut claim = table.claim(7, &signals).unwrap();
        let id = claim.submit(b"request").unwrap();
        assert_eq!(table.state(claim.index()), SlotState::Submitted);
        let taken = table.take(claim.index()).unwrap();
        assert_eq!(
            (taken.request_id, &taken.request[..]),
            (id, &b"request"[..])
        );
        assert!(table.take(claim.index()).is_none(), "taken once");
        table.answer(taken.index, id, b"answer", Some(&key(9)), &signals);
        assert_eq!(signals.answered.load(Ordering::Relaxed), 1);
        let answer = claim.take_answer().unwrap();
        assert_eq!(answer.response, b"answer");
        assert_eq!(answer.key.unwrap(), key(9));
        assert_eq!(table.busy(), 0);
        assert_eq!(signals.freed.load(Ordering::Relaxed), 1);
        // Wiped: nothing of the answer or the key is left in the slot.
        // SAFETY: the round trip is over (the slot is Free) and this thread is
        // the only user of the table, so no write can overlap these reads.
        unsafe {
            assert!(
                (*table.slots[taken.index].payload.get())
                    .iter()
                    .all(|b| *b == 0)
            );
            assert_eq!(*table.keys.0[taken.index].get(), [0u8; KEY_LEN]);
        }
    }

    #[test]
    fn too_large_and_full() {
        let table = SlotTable::<2>::new_boxed();
        let signals = Counting::default();
        let mut a = table.claim(1, &signals).unwrap();
        assert_eq!(
            a.submit(&vec![0u8; PAYLOAD_LEN + 1]),
            Err(TooLarge {
                len: PAYLOAD_LEN + 1
            })
        );
        let _b = table.claim(1, &signals).unwrap();
        assert!(table.claim(1, &signals).is_none(), "all slots busy");
        drop(a);
        assert!(
            table.claim(1, &signals).is_some(),
            "a dropped claim frees its slot"
        );
    }

    #[test]
    fn an_abandoned_request_is_never_answered_to_the_next_user() {
        let table = SlotTable::<1>::new_boxed();
        let signals = Counting::default();
        let mut first = table.claim(1, &signals).unwrap();
        let first_id = first.submit(b"first").unwrap();
        let taken = table.take(0).unwrap();
        drop(first); // gives up while the broker works
        assert_eq!(table.state(0), SlotState::Abandoned);
        assert!(
            table.claim(2, &signals).is_none(),
            "not reusable until the broker is done"
        );
        table.answer(taken.index, first_id, b"for first", Some(&key(1)), &signals);
        assert_eq!(table.state(0), SlotState::Free);
        assert_eq!(signals.answered.load(Ordering::Relaxed), 0);
        let mut second = table.claim(2, &signals).unwrap();
        let second_id = second.submit(b"second").unwrap();
        // A late answer to the first request finds another request id.
        table.answer(0, first_id, b"for first", Some(&key(1)), &signals);
        assert!(!second.answered());
        let taken = table.take(0).unwrap();
        table.answer(0, taken.request_id, b"for second", None, &signals);
        let answer = second.take_answer().unwrap();
        assert_eq!(
            (answer.response.as_slice(), answer.key.is_none()),
            (&b"for second"[..], true)
        );
        assert_eq!(taken.request_id, second_id);
    }

    #[test]
    fn restart_and_exit_recovery() {
        let table = SlotTable::<3>::new_boxed();
        let signals = Counting::default();
        let mut running = table.claim(10, &signals).unwrap();
        running.submit(b"r").unwrap();
        table.take(running.index()).unwrap();
        let mut abandoned = table.claim(11, &signals).unwrap();
        abandoned.submit(b"a").unwrap();
        table.take(abandoned.index()).unwrap();
        drop(abandoned);
        // A backend that dies without unwinding: its slot is found by pid.
        let mut orphan = table.claim(12, &signals).unwrap();
        orphan.submit(b"o").unwrap();
        std::mem::forget(orphan);
        table.recover(b"restarted", &signals);
        let answer = running.take_answer().unwrap();
        assert_eq!(answer.response, b"restarted");
        table.release_owned_by(12, &signals);
        assert_eq!(table.busy(), 0);
    }

    /// Many backends and a broker thread; backends give up at random points.
    /// Every answer read is the answer to that backend's own request, and
    /// every slot ends free and wiped.
    #[test]
    fn threads_never_read_each_others_answers() {
        const BACKENDS: usize = 8;
        const ROUNDS: usize = 400;
        let table: Arc<SlotTable<4>> = Arc::from(SlotTable::<4>::new_boxed());
        let signals = Arc::new(Counting::default());
        let stop = Arc::new(AtomicBool::new(false));
        let broker = {
            let (table, signals, stop) = (table.clone(), signals.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut pending: Vec<Taken> = Vec::new();
                let mut turn = 0usize;
                while !stop.load(Ordering::Acquire) || !pending.is_empty() {
                    for index in 0..4 {
                        if let Some(taken) = table.take(index) {
                            pending.push(taken);
                        }
                    }
                    // Answer out of order, some later than others.
                    turn += 1;
                    if let Some(taken) =
                        (!pending.is_empty()).then(|| pending.swap_remove(turn % pending.len()))
                    {
                        let mut answer = b"answer to ".to_vec();
                        answer.extend_from_slice(&taken.request);
                        let k = key(taken.request[0]);
                        table.answer(taken.index, taken.request_id, &answer, Some(&k), &*signals);
                    }
                    std::thread::yield_now();
                }
            })
        };
        let backends: Vec<_> = (0..BACKENDS)
            .map(|b| {
                let (table, signals) = (table.clone(), signals.clone());
                std::thread::spawn(move || {
                    let mut answered = 0;
                    for round in 0..ROUNDS {
                        let mut claim = loop {
                            if let Some(c) = table.claim(b as i32 + 1, &*signals) {
                                break c;
                            }
                            std::thread::yield_now();
                        };
                        let request = format!("{}:{b}:{round}", (b as u8 + 1) as char);
                        let mut bytes = vec![b as u8 + 1];
                        bytes.extend_from_slice(request.as_bytes());
                        claim.submit(&bytes).unwrap();
                        let give_up_after = (round * 7 + b) % 5; // 0: at once
                        let started = Instant::now();
                        loop {
                            if claim.answered() {
                                let answer = claim.take_answer().unwrap();
                                let mut expected = b"answer to ".to_vec();
                                expected.extend_from_slice(&bytes);
                                assert_eq!(answer.response, expected);
                                assert_eq!(answer.key.unwrap(), key(b as u8 + 1));
                                answered += 1;
                                break;
                            }
                            if give_up_after == 0
                                || started.elapsed()
                                    > Duration::from_micros(give_up_after as u64 * 50)
                                    && round % 3 == 0
                            {
                                drop(claim);
                                break;
                            }
                            std::thread::yield_now();
                        }
                    }
                    answered
                })
            })
            .collect();
        let answered: usize = backends.into_iter().map(|t| t.join().unwrap()).sum();
        stop.store(true, Ordering::Release);
        broker.join().unwrap();
        assert!(
            answered > BACKENDS * ROUNDS / 2,
            "most requests were answered: {answered}"
        );
        // Abandoned slots are freed by the broker's (late) answers.
        assert_eq!(table.busy(), 0);
        for index in 0..4 {
            // SAFETY: every backend and broker thread has been joined, so this
            // thread is the table's only user and the reads race with nothing.
            unsafe {
                assert_eq!(*table.keys.0[index].get(), [0u8; KEY_LEN]);
                assert!((*table.slots[index].payload.get()).iter().all(|b| *b == 0));
            }
        }
    }
}
