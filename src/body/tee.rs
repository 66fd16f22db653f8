//! The vault's side copy of a response body as it streams: handed over frame by frame,
//! never waited for, abandoned (not the client) when it falls too far behind. It knows
//! nothing of the vault; the writer's end is a [`TeeReceiver`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

/// A streaming side copy of a response body (a layer the vault keeps as it is pulled): each
/// frame is handed to the copy's writer and never waited for. The copy may hold at most
/// `limit` bytes its writer has not yet written; past that (the copy falls behind), it is
/// abandoned, not the client. The allowance is in bytes, not frames, so the size of the
/// upstream's reads does not decide how far behind a copy may fall. `complete` is set only
/// when the body reached its end.
pub struct Tee {
    tx: Option<tokio::sync::mpsc::UnboundedSender<Bytes>>,
    /// Bytes handed over and not yet written (shared with the [`TeeReceiver`]).
    held: Arc<AtomicUsize>,
    limit: usize,
    complete: Arc<AtomicBool>,
}

/// The writer's end of a [`Tee`].
pub struct TeeReceiver {
    rx: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
    held: Arc<AtomicUsize>,
    /// The length of the chunk last received: written once the next one is asked for.
    last: usize,
    complete: Arc<AtomicBool>,
}

impl Tee {
    /// A copy allowed to hold `limit` unwritten bytes, and its writer's end.
    pub fn new(limit: usize) -> (Tee, TeeReceiver) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let held = Arc::new(AtomicUsize::new(0));
        let complete = Arc::new(AtomicBool::new(false));
        let tee = Tee {
            tx: Some(tx),
            held: held.clone(),
            limit,
            complete: complete.clone(),
        };
        let receiver = TeeReceiver {
            rx,
            held,
            last: 0,
            complete,
        };
        (tee, receiver)
    }

    pub(super) fn push(&mut self, data: &Bytes) {
        if let Some(tx) = &self.tx {
            let held = self.held.fetch_add(data.len(), Ordering::AcqRel) + data.len();
            if held > self.limit || tx.send(data.clone()).is_err() {
                self.tx = None; // fell behind (or its writer is gone): abandoned
            }
        }
    }

    pub(super) fn finish(&mut self, complete: bool) {
        if complete && self.tx.is_some() {
            self.complete.store(true, Ordering::Release);
        }
        self.tx = None;
    }
}

impl TeeReceiver {
    /// The next chunk; the previous one counts as written. `None` once the copy ended,
    /// completely or not (see [`TeeReceiver::complete`]).
    pub async fn recv(&mut self) -> Option<Bytes> {
        // Taken, not read: a `recv` dropped while it waits must not give the chunk back twice.
        self.held
            .fetch_sub(std::mem::take(&mut self.last), Ordering::AcqRel);
        let chunk = self.rx.recv().await;
        self.last = chunk.as_ref().map_or(0, Bytes::len);
        chunk
    }

    /// The body reached its end and every frame of it was handed over (not abandoned).
    pub fn complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn many_small_frames_within_the_byte_allowance_are_all_copied() {
        let (mut tee, mut rx) = Tee::new(64 << 10);
        // 1,000 frames of 16 bytes: far more frames than a frame-counted allowance took.
        for i in 0..1000u32 {
            tee.push(&Bytes::from(format!("{i:016}")));
        }
        tee.finish(true);
        let mut got = 0;
        while let Some(chunk) = rx.recv().await {
            got += chunk.len();
        }
        assert_eq!(got, 16_000);
        assert!(rx.complete());
    }

    #[tokio::test]
    async fn a_copy_holding_more_unwritten_bytes_than_its_allowance_is_abandoned() {
        let (mut tee, mut rx) = Tee::new(100);
        tee.push(&Bytes::from(vec![0u8; 60]));
        tee.push(&Bytes::from(vec![0u8; 60])); // 120 unwritten: over the allowance
        tee.push(&Bytes::from(vec![0u8; 10]));
        tee.finish(true);
        assert_eq!(rx.recv().await.map(|c| c.len()), Some(60));
        assert_eq!(
            rx.recv().await,
            None,
            "nothing after the frame that overran"
        );
        assert!(!rx.complete(), "an abandoned copy is never complete");
    }

    #[tokio::test]
    async fn what_the_writer_has_written_no_longer_counts_against_the_allowance() {
        let (mut tee, mut rx) = Tee::new(100);
        // A chunk counts until the writer asks for the next one (it is being written):
        // at most two 40-byte chunks are held at once.
        for _ in 0..10 {
            tee.push(&Bytes::from(vec![0u8; 40]));
            assert_eq!(rx.recv().await.map(|c| c.len()), Some(40));
        }
        tee.finish(true);
        assert_eq!(rx.recv().await, None);
        assert!(
            rx.complete(),
            "400 bytes through a 100-byte allowance, written as they came"
        );
    }

    #[tokio::test]
    async fn a_body_that_ends_in_an_error_is_not_complete() {
        let (mut tee, mut rx) = Tee::new(100);
        tee.push(&Bytes::from_static(b"abc"));
        tee.finish(false);
        assert_eq!(rx.recv().await.map(|c| c.len()), Some(3));
        assert_eq!(rx.recv().await, None);
        assert!(!rx.complete());
    }
}
