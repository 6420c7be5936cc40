//! Commands (imperative) that `decide` turns into events, and the size limits it enforces.

use crate::event::AgentEventKind;
use crate::ids::{ClientId, RunId, ThreadId, UserId};

#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    CreateThread {
        thread_id: ThreadId,
        owner: UserId,
        title: Option<String>,
        metadata: Option<String>,
    },
    RegisterRun {
        thread_id: ThreadId,
        run_id: RunId,
        agent_name: String,
    },
    RecordAgentEvent {
        run_id: RunId,
        kind: AgentEventKind,
        data: String,
        tool_call_id: Option<String>,
    },
    ExpireRun {
        run_id: RunId,
    },
    AcknowledgeDelivery {
        user_id: UserId,
        client_id: ClientId,
        user_seq: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_data_bytes: usize,
    pub max_title_chars: usize,
    pub max_metadata_bytes: usize,
    pub max_agent_name_chars: usize,
    /// A run idle longer than this is expired.
    pub run_ttl_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_data_bytes: 64 * 1024,
            max_title_chars: 512,
            max_metadata_bytes: 16 * 1024,
            max_agent_name_chars: 128,
            run_ttl_ms: 24 * 60 * 60 * 1000,
        }
    }
}
