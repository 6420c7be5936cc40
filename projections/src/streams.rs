//! Streamed messages as users see them: each user's open runs with their open
//! messages and the text accumulated so far (what `welcome` lists and a late
//! joiner resumes into), plus a chained digest of every completed message's text,
//! so `verify` and `rebuild` compare the texts without keeping them all.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use threadline_engine::{Event, MessageId, RunId, ThreadId, UserId};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Streams {
    /// user → the user's open runs (registered or running).
    open: BTreeMap<UserId, BTreeMap<RunId, OpenRun>>,
    /// Completed messages, folded into one chained digest.
    completed: CompletedTexts,
}

/// A run that has not ended, as its owner's sockets list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenRun {
    pub thread_id: ThreadId,
    pub agent_name: String,
    /// The `user_seq` of the run's last event.
    pub user_seq: u64,
    /// Open messages, by id.
    pub messages: BTreeMap<MessageId, OpenMessage>,
}

/// A message still being streamed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenMessage {
    /// The `user_seq` of its `message_started`: resuming after one less replays it whole.
    pub from_user_seq: u64,
    /// The `user_seq` of its last event.
    pub user_seq: u64,
    /// Its last delta's `seq`.
    pub seq: u64,
    pub text: String,
}

/// Every completed message's text, chained: `digest = SHA-256(digest ‖ run ‖ message ‖ text)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletedTexts {
    pub count: u64,
    pub bytes: u64,
    pub digest: [u8; 32],
}

impl CompletedTexts {
    fn add(&mut self, run: &RunId, message: &MessageId, text: &str) {
        let mut h = Sha256::new();
        h.update(self.digest);
        h.update(run.as_str());
        h.update([0]);
        h.update(message.as_str());
        h.update([0]);
        h.update(text);
        self.digest = h.finalize().into();
        self.count += 1;
        self.bytes += text.len() as u64;
    }
}

impl Streams {
    /// Folds one event of `owner`'s thread, which got `user_seq` in the owner's queue.
    pub(crate) fn apply(&mut self, event: &Event, owner: &UserId, user_seq: u64) {
        if let Event::RunRegistered {
            thread_id,
            run_id,
            agent_name,
        } = event
        {
            self.open.entry(owner.clone()).or_default().insert(
                run_id.clone(),
                OpenRun {
                    thread_id: thread_id.clone(),
                    agent_name: agent_name.clone(),
                    user_seq,
                    messages: BTreeMap::new(),
                },
            );
            return;
        }
        let Some(run_id) = event.run_id() else {
            return;
        };
        let Some(runs) = self.open.get_mut(owner) else {
            return;
        };
        let Some(run) = runs.get_mut(run_id) else {
            return;
        };
        run.user_seq = user_seq;
        match event {
            Event::MessageStarted { message_id, .. } => {
                run.messages.insert(
                    message_id.clone(),
                    OpenMessage {
                        from_user_seq: user_seq,
                        user_seq,
                        seq: 0,
                        text: String::new(),
                    },
                );
            }
            Event::MessageDeltaAppended {
                message_id,
                seq,
                text,
                ..
            } => {
                if let Some(m) = run.messages.get_mut(message_id) {
                    m.user_seq = user_seq;
                    m.seq = *seq;
                    m.text.push_str(text);
                }
            }
            Event::MessageCompleted { message_id, .. } => {
                if let Some(m) = run.messages.remove(message_id) {
                    self.completed.add(run_id, message_id, &m.text);
                }
            }
            _ => {}
        }
        if event.ends_run() {
            // The run's terminal event completes its open messages, in id order.
            if let Some(run) = runs.remove(run_id) {
                for (message_id, m) in run.messages {
                    self.completed.add(run_id, &message_id, &m.text);
                }
            }
            if runs.is_empty() {
                self.open.remove(owner);
            }
        }
    }

    /// The user's open runs, in run id order.
    pub fn open_runs(&self, user: &UserId) -> impl Iterator<Item = (&RunId, &OpenRun)> {
        self.open.get(user).into_iter().flatten()
    }

    /// An open message of `user`'s, with its run.
    pub fn open_message(&self, user: &UserId, message: &MessageId) -> Option<&OpenMessage> {
        self.open_runs(user)
            .find_map(|(_, run)| run.messages.get(message))
    }

    pub fn completed(&self) -> &CompletedTexts {
        &self.completed
    }
}
