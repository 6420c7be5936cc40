//! [`Turns`]: submissions that touch one thread take turns inside this process.
//!
//! Every event of a thread is appended on the thread's expected version, so two
//! submissions judged on the same version race, and the loser is judged and
//! appended again. Inside one process that race is pure waste: only one of them
//! can land per version, and under a burst on one thread the losers can run out
//! of attempts (`Contended`, answered `503`) although nothing else is wrong.
//! Taking turns per thread removes it; the expected version stays the guard
//! against writers in other processes sharing the log (gateways over JetStream).
//!
//! Turns are first come, first served (tokio's mutex is fair). A submission
//! naming several threads takes their turns in the threads' order, so two such
//! submissions cannot wait on each other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use threadline_engine::ThreadId;
use tokio::sync::OwnedMutexGuard;

#[derive(Debug, Default)]
pub(crate) struct Turns {
    /// One entry per thread with a submission holding or awaiting its turn;
    /// removed when the last of them is done.
    lines: Mutex<HashMap<ThreadId, Arc<tokio::sync::Mutex<()>>>>,
}

impl Turns {
    fn lines(&self) -> MutexGuard<'_, HashMap<ThreadId, Arc<tokio::sync::Mutex<()>>>> {
        // The map is consistent after every statement; poison carries no half state.
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the turn on each of `threads` (in order, duplicates ignored).
    pub(crate) async fn take(&self, mut threads: Vec<ThreadId>) -> Turn<'_> {
        threads.sort();
        threads.dedup();
        let queued: Vec<(ThreadId, Arc<tokio::sync::Mutex<()>>)> = {
            let mut lines = self.lines();
            threads
                .into_iter()
                .map(|t| {
                    let line = Arc::clone(lines.entry(t.clone()).or_default());
                    (t, line)
                })
                .collect()
        };
        let mut turn = Turn {
            turns: self,
            held: Vec::with_capacity(queued.len()),
        };
        for (thread, line) in queued {
            // Pushed before awaiting: a submission dropped while it waits (its
            // client went away) still leaves the map through `Drop`.
            turn.held.push((thread, None));
            let guard = line.lock_owned().await;
            if let Some(last) = turn.held.last_mut() {
                last.1 = Some(guard);
            }
        }
        turn
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lines().len()
    }
}

/// The turns one submission holds; given back when dropped.
pub(crate) struct Turn<'a> {
    turns: &'a Turns,
    /// Each thread, with its guard once the turn came.
    held: Vec<(ThreadId, Option<OwnedMutexGuard<()>>)>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut lines = self.turns.lines();
        for (thread, guard) in self.held.drain(..) {
            drop(guard);
            // Everyone in line holds a clone of the line (taken under this same lock):
            // the map's reference alone means nobody else is in it.
            if lines
                .get(&thread)
                .is_some_and(|l| Arc::strong_count(l) == 1)
            {
                lines.remove(&thread);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_second_submission_on_a_thread_waits_for_the_first() {
        let turns = Turns::default();
        let a = ThreadId::generate();
        let b = ThreadId::generate();
        let first = turns.take(vec![a.clone(), b.clone()]).await;
        // Another thread's turn is free.
        drop(turns.take(vec![ThreadId::generate()]).await);
        let second = turns.take(vec![b.clone()]);
        tokio::pin!(second);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), second.as_mut())
                .await
                .is_err(),
            "took b's turn while the first held it"
        );
        drop(first);
        let second = second.await;
        assert_eq!(turns.len(), 1, "only b is still in line");
        drop(second);
        assert_eq!(turns.len(), 0, "nothing left once everyone is done");
    }

    #[tokio::test]
    async fn a_submission_dropped_while_waiting_leaves_no_line_behind() {
        let turns = Turns::default();
        let a = ThreadId::generate();
        let first = turns.take(vec![a.clone()]).await;
        let waiting = tokio::time::timeout(Duration::from_millis(20), turns.take(vec![a])).await;
        assert!(waiting.is_err());
        drop(first);
        assert_eq!(turns.len(), 0);
    }
}
