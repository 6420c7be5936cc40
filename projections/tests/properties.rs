//! Property tests: random multi-user workloads keep isolation, dense
//! `user_seq`s, and rebuilt / restarted projections equal to live ones.

use std::sync::Arc;

use proptest::prelude::*;
use threadline_engine::{
    Actor, AgentEventKind, ClientId, Command, DomainError, Event, Limits, Role, RunId, ThreadId,
    UserId,
};
use threadline_projections::{
    decode_event, rebuild, CheckpointPolicy, CommandService, Follower, Projector, Submission,
    SubmitError,
};
use threadline_storage::{EventLog, MemoryLog, Position};

const USERS: [&str; 3] = ["alice", "bob@example.com", "e2e-user-7"];
const CLIENTS: [&str; 3] = ["default", "phone", "laptop.2"];

#[derive(Debug, Clone)]
struct Op {
    actor: usize,
    kind: u8,
    target: usize,
    extra: u8,
}

fn op() -> impl Strategy<Value = Op> {
    (0usize..5, 0u8..6, 0usize..64, 0u8..16).prop_map(|(actor, kind, target, extra)| Op {
        actor,
        kind,
        target,
        extra,
    })
}

fn actor(i: usize) -> Actor {
    match i {
        0..=2 => Actor::new(UserId::parse(USERS[i]).unwrap(), Role::User),
        3 => Actor::new(UserId::parse("agent-1").unwrap(), Role::Agent),
        _ => Actor::new(UserId::parse("auditor").unwrap(), Role::Auditor),
    }
}

struct World {
    log: Arc<MemoryLog>,
    projector: Arc<Projector<MemoryLog>>,
    commands: CommandService<MemoryLog>,
    _fold: Follower,
    threads: Vec<(ThreadId, usize)>,
    runs: Vec<RunId>,
    now: u64,
    limits: Limits,
}

impl World {
    fn submit(&mut self, actor: &Actor, command: Command) -> Result<(), SubmitError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(
            self.commands
                .submit(actor, &[Submission::new(command)], self.now),
        )
        .map(|_| ())
    }

    fn run(&mut self, op: &Op) {
        self.now += 1000;
        let who = actor(op.actor);
        let command = match op.kind {
            0 => {
                // Users create for themselves; sometimes they try for someone else.
                let owner = if op.actor == 3 || op.extra.is_multiple_of(4) {
                    op.target % 3
                } else {
                    op.actor % 3
                };
                Command::CreateThread {
                    thread_id: ThreadId::generate(),
                    owner: UserId::parse(USERS[owner]).unwrap(),
                    title: Some(format!("t{}", op.target)),
                    metadata: None,
                }
            }
            1 if !self.threads.is_empty() => Command::RegisterRun {
                thread_id: self.threads[op.target % self.threads.len()].0.clone(),
                run_id: RunId::generate(),
                agent_name: "planner".into(),
            },
            2 | 3 if !self.runs.is_empty() => {
                let run_id = self.runs[op.target % self.runs.len()].clone();
                // Mostly valid lifecycles, with invalid ones mixed in.
                let fresh = self.projector.read(|m| {
                    m.registry()
                        .run(&run_id)
                        .map(|r| r.last_event.as_deref() == Some("run_registered"))
                });
                let kind = if fresh == Some(true) && !op.extra.is_multiple_of(4) {
                    AgentEventKind::Started
                } else {
                    [
                        AgentEventKind::Thinking,
                        AgentEventKind::ToolExecuting,
                        AgentEventKind::ToolCompleted,
                        AgentEventKind::Thinking,
                        AgentEventKind::Started,
                        AgentEventKind::Completed,
                        AgentEventKind::Error,
                        AgentEventKind::ToolExecuting,
                    ][op.extra as usize % 8]
                };
                Command::RecordAgentEvent {
                    run_id,
                    kind,
                    data: format!("{{\"n\":{}}}", op.target),
                    tool_call_id: op
                        .extra
                        .is_multiple_of(3)
                        .then(|| format!("call-{}", op.target % 4)),
                }
            }
            4 => Command::AcknowledgeDelivery {
                user_id: UserId::parse(USERS[op.target % 3]).unwrap(),
                client_id: ClientId::parse(CLIENTS[op.target / 3 % CLIENTS.len()]).unwrap(),
                user_seq: op.extra as u64 + 1,
            },
            5 if !self.runs.is_empty() => {
                // Jump the clock past the TTL now and then so expiry is exercised.
                if op.extra.is_multiple_of(5) {
                    self.now += self.limits.run_ttl_ms + 1;
                }
                Command::ExpireRun {
                    run_id: self.runs[op.target % self.runs.len()].clone(),
                }
            }
            _ => return,
        };
        let result = self.submit(&who, command.clone());
        match (&command, &result) {
            (
                Command::CreateThread {
                    thread_id, owner, ..
                },
                Ok(()),
            ) => {
                let i = USERS.iter().position(|u| *u == owner.as_str()).unwrap();
                self.threads.push((thread_id.clone(), i));
            }
            (
                Command::RegisterRun {
                    run_id, thread_id, ..
                },
                r,
            ) => {
                let owner = self.threads.iter().find(|(t, _)| t == thread_id).unwrap().1;
                // A user may never register a run on another user's thread, and is told "not found".
                if op.actor <= 2 && op.actor != owner {
                    assert!(
                        matches!(
                            r,
                            Err(SubmitError::Domain {
                                error: DomainError::ThreadNotFound(_),
                                ..
                            })
                        ),
                        "{r:?}"
                    );
                }
                if r.is_ok() {
                    self.runs.push(run_id.clone());
                }
            }
            (_, Ok(())) if op.actor == 4 => panic!("an auditor wrote: {command:?}"),
            _ => {}
        }
    }
}

fn check_invariants(world: &World) {
    let log = &world.log;
    let records = log.read_from(Position(1), usize::MAX).unwrap();
    assert_eq!(records.len() as u64, log.head().0);
    world.projector.read(|model| {
        let registry = model.registry();
        let delivery = model.delivery();
        let mut thread_events = 0u64;
        for record in &records {
            if let Some(thread) = record.stream.strip_prefix("thread:") {
                thread_events += 1;
                let owner = registry
                    .owner_of(&ThreadId::parse(thread).unwrap())
                    .unwrap();
                assert!(
                    delivery.seq_of(owner, record.position).is_some(),
                    "event {} missing from its owner's queue",
                    record.position
                );
                for user in USERS {
                    let user = UserId::parse(user).unwrap();
                    if &user != owner {
                        assert!(
                            delivery.seq_of(&user, record.position).is_none(),
                            "event {} leaked to {user}",
                            record.position
                        );
                    }
                }
            }
        }
        let mut queued = 0;
        for user in delivery.users() {
            let queue = delivery.read_after(user, 0, usize::MAX);
            queued += queue.len() as u64;
            for (i, (seq, _)) in queue.iter().enumerate() {
                assert_eq!(*seq, i as u64 + 1, "user_seq of {user} is not dense");
            }
            assert!(
                queue.windows(2).all(|w| w[0].1 < w[1].1),
                "queue of {user} out of order"
            );
            assert_eq!(delivery.user_head(user), queue.len() as u64);
        }
        assert_eq!(
            queued, thread_events,
            "an event was delivered to more than one user"
        );
        check_ledger(model, &records);
    });
}

/// The delivery ledger, against the log's own `cursor_advanced` records: an ack recorded
/// for a client is listed for exactly the events up to its `user_seq`, and each event's
/// ack is the first record (in log order) that covered it.
fn check_ledger(model: &threadline_projections::ReadModel, records: &[threadline_storage::Record]) {
    let mut acks: Vec<(UserId, ClientId, u64, u64, u64)> = Vec::new();
    for record in records {
        if let Ok(Event::CursorAdvanced {
            user_id,
            client_id,
            user_seq,
        }) = decode_event(&record.payload)
        {
            acks.push((
                user_id,
                client_id,
                user_seq,
                record.position.0,
                record.recorded_at_ms,
            ));
        }
    }
    for user in USERS {
        let user = UserId::parse(user).unwrap();
        let head = model.delivery().user_head(&user);
        for client in CLIENTS {
            let client = ClientId::parse(client).unwrap();
            let mine: Vec<_> = acks
                .iter()
                .filter(|a| a.0 == user && a.1 == client)
                .collect();
            let acked = mine.iter().map(|a| a.2).max().unwrap_or(0);
            assert_eq!(model.delivery().cursor(&user, &client), acked);
            // Every user_seq the user has, and a few past it (acks may run ahead of the queue).
            for seq in 1..=head.max(acked) + 2 {
                let listed = model.acks().covering(&user, &client, seq);
                let expected = mine.iter().find(|a| a.2 >= seq);
                match (listed, expected) {
                    (None, None) => assert!(seq > acked),
                    (Some(l), Some(e)) => {
                        assert!(
                            seq <= acked,
                            "{user}/{client} listed for {seq} beyond {acked}"
                        );
                        assert_eq!((l.user_seq, l.position, l.at_ms), (e.2, e.3, e.4));
                    }
                    (l, e) => panic!("{user}/{client} seq {seq}: listed {l:?}, log says {e:?}"),
                }
            }
        }
        let listed: Vec<_> = model
            .acks()
            .clients(&user)
            .map(|(c, a)| (c.clone(), a.user_seq))
            .collect();
        for (client, seq) in &listed {
            assert_eq!(model.delivery().cursor(&user, client), *seq);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_workloads_keep_isolation_and_rebuild_equality(ops in proptest::collection::vec(op(), 1..300), cut in 0usize..300) {
        let log = Arc::new(MemoryLog::new());
        let projector = Arc::new(Projector::open(log.clone()).unwrap());
        let limits = Limits::default();
        let mut world = World {
            log: log.clone(),
            _fold: projector.follow(CheckpointPolicy::default()).unwrap(),
            commands: CommandService::new(projector.clone(), limits.clone()),
            projector,
            threads: Vec::new(),
            runs: Vec::new(),
            now: threadline_storage::now_ms(),
            limits,
        };
        for (i, op) in ops.iter().enumerate() {
            if i == cut % ops.len() {
                world.projector.checkpoint().unwrap();
            }
            world.run(op);
        }
        check_invariants(&world);
        let live = world.projector.read(|m| m.digests());
        prop_assert_eq!(live.position, log.head());
        // Rebuilt from position 1: same digests.
        let rebuilt = rebuild(&*log, |_, _| {}).unwrap().digests();
        prop_assert_eq!(rebuilt, live);
        // Restarted from the mid-run checkpoint: same digests.
        let restarted = Projector::open(log.clone()).unwrap();
        prop_assert_eq!(restarted.read(|m| m.digests()), live);
    }
}

/// Fuzzing without nightly: a checkpoint is stored bytes, so damage to it is refused
/// (by its checksum) or read, never a panic or an abort. (The decoder trusts a body
/// that passes its checksum: the data dir is private to the server's user.) Runs for
/// `THREADLINE_FUZZ_SECS` seconds when set (see `threadline-fuzz`).
mod fuzz {
    use super::*;

    #[test]
    fn damaged_checkpoints_are_refused_never_a_crash() {
        let input = (
            proptest::collection::vec(any::<u8>(), 0..400),
            any::<u32>(),
            proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6),
        );
        threadline_fuzz::run("checkpoint", input, |(bytes, crc, flips)| {
            // Anything at all.
            let _ = threadline_projections::ReadModel::from_checkpoint(&bytes);
            // The current tag and a checksum that does not match the body.
            let mut tagged = vec![6u8];
            let wrong = if crc == crc32c::crc32c(&bytes) {
                crc ^ 1
            } else {
                crc
            };
            tagged.extend(wrong.to_le_bytes());
            tagged.extend(&bytes);
            prop_assert!(threadline_projections::ReadModel::from_checkpoint(&tagged).is_err());
            // A real checkpoint with bytes flipped after its tag.
            let mut real = threadline_projections::ReadModel::default().to_checkpoint();
            for (at, x) in flips {
                let i = 1 + at.index(real.len() - 1);
                real[i] ^= x;
            }
            let _ = threadline_projections::ReadModel::from_checkpoint(&real);
            Ok(())
        });
    }
}
