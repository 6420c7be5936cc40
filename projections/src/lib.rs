//! Read models folded from the log: the thread-run registry, the per-user
//! delivery queues and the pending nudges, checkpointed together, rebuildable from position 1 and
//! verifiable by digest.
//!
//! Architecture invariant: the live path ([`Projector::catch_up`]) and the
//! tools (`rebuild`, `verify`) run the same fold, [`ReadModel::apply`]; only
//! the fold writes the model, and the write side ([`CommandService`]) reads it
//! and waits on the projected position, never folding itself.

mod acks;
mod codec;
mod commands;
mod delivery;
mod error;
mod model;
mod nudges;
mod projector;
mod streams;
mod turns;
pub mod verify;

pub use acks::{Ack, Acks};
pub use codec::{decode_event, encode_event, PAYLOAD_FORMAT};
pub use commands::{CommandService, Outcome, Submission, SubmitError};
pub use delivery::Delivery;
pub use error::ProjectionError;
pub use model::{Digests, ReadModel, CHECKPOINT_NAME};
pub use nudges::{is_subject, Nudges, PendingNudge, MAX_PENDING_PER_USER};
pub use projector::{
    load_checkpoint, rebuild, store_checkpoint, CheckpointPolicy, Follower, Projector, PAGE,
};
pub use streams::{CompletedTexts, OpenMessage, OpenRun, Streams};
