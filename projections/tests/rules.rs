//! Given/when/then tests of the projection and submission rules.

use std::sync::{Arc, Mutex};

use threadline_engine::{
    Actor, AgentEventKind, ClientId, Command, DomainError, EventId, Limits, Role, RunId, ThreadId,
    UserId,
};
use threadline_projections::{
    encode_event, load_checkpoint, rebuild, CheckpointPolicy, CommandService, Follower, Outcome,
    ProjectionError, Projector, ReadModel, Submission, SubmitError,
};
use threadline_storage::{EventLog, MemoryLog, NewEvent, Position, Record};

/// Records are stamped with the log's clock, so commands are judged on the same one.
fn now() -> u64 {
    threadline_storage::now_ms()
}

fn user(name: &str) -> Actor {
    Actor::new(UserId::parse(name).unwrap(), Role::User)
}
fn agent() -> Actor {
    Actor::new(UserId::parse("agent-1").unwrap(), Role::Agent)
}

struct Given {
    log: Arc<MemoryLog>,
    projector: Arc<Projector<MemoryLog>>,
    commands: CommandService<MemoryLog>,
    _fold: Follower,
    limits: Limits,
}

fn given() -> Given {
    let log = Arc::new(MemoryLog::new());
    let projector = Arc::new(Projector::open(log.clone()).unwrap());
    let limits = Limits::default();
    Given {
        _fold: projector.follow(CheckpointPolicy::default()).unwrap(),
        commands: CommandService::new(projector.clone(), limits.clone()),
        projector,
        log,
        limits,
    }
}

impl Given {
    fn when(
        &self,
        actor: &Actor,
        subs: &[Submission],
        now: u64,
    ) -> Result<Vec<Option<Outcome>>, SubmitError> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(self.commands.submit(actor, subs, now))
    }
    fn ok(&self, actor: &Actor, command: Command) -> Outcome {
        self.when(actor, &[Submission::new(command)], now())
            .unwrap()
            .remove(0)
            .unwrap()
    }
    fn thread(&self, owner: &str) -> ThreadId {
        let thread_id = ThreadId::generate();
        self.ok(
            &user(owner),
            Command::CreateThread {
                thread_id: thread_id.clone(),
                owner: UserId::parse(owner).unwrap(),
                title: None,
                metadata: None,
            },
        );
        thread_id
    }
    fn started_run(&self, thread_id: &ThreadId) -> RunId {
        let run_id = RunId::generate();
        self.ok(
            &agent(),
            Command::RegisterRun {
                thread_id: thread_id.clone(),
                run_id: run_id.clone(),
                agent_name: "a".into(),
            },
        );
        self.ok(&agent(), event(&run_id, AgentEventKind::Started));
        run_id
    }
}

fn event(run_id: &RunId, kind: AgentEventKind) -> Command {
    Command::RecordAgentEvent {
        run_id: run_id.clone(),
        kind,
        data: "{}".into(),
        tool_call_id: None,
    }
}

#[test]
fn outcomes_carry_dense_thread_versions_and_user_seqs() {
    let g = given();
    let t = g.thread("alice");
    let run = g.started_run(&t);
    let o = g.ok(&agent(), event(&run, AgentEventKind::Thinking));
    assert_eq!(
        (o.position, o.thread_version, o.user_seq),
        (Position(4), 4, Some(4))
    );
    assert_eq!(o.thread_id.as_ref(), Some(&t));
    // Bob's first event is his user_seq 1, whatever the global position.
    let b = g.thread("bob");
    let ob = g
        .projector
        .read(|m| m.delivery().user_head(&UserId::parse("bob").unwrap()));
    assert_eq!(ob, 1);
    assert_eq!(
        g.projector
            .read(|m| m.registry().thread(&b).unwrap().version),
        1
    );
}

#[test]
fn a_repeated_event_id_returns_the_original_and_appends_nothing() {
    let g = given();
    let run = g.started_run(&g.thread("alice"));
    let id = EventId::generate();
    let sub = Submission {
        event_id: Some(id),
        ..Submission::new(event(&run, AgentEventKind::Thinking))
    };
    let first = g
        .when(&agent(), std::slice::from_ref(&sub), now())
        .unwrap()
        .remove(0)
        .unwrap();
    // Even after the run closed, the retry answers with the original result.
    g.ok(&agent(), event(&run, AgentEventKind::Completed));
    let head = g.log.head();
    let again = g.when(&agent(), &[sub], now()).unwrap().remove(0).unwrap();
    assert!(again.duplicate && !first.duplicate);
    assert_eq!(
        (again.position, again.user_seq, again.thread_version),
        (first.position, first.user_seq, first.thread_version)
    );
    assert_eq!(g.log.head(), head);
}

#[test]
fn a_repeated_event_id_is_answered_only_to_a_caller_who_may_see_it_and_only_when_identical() {
    let g = given();
    let run_a = g.started_run(&g.thread("alice"));
    let run_b = g.started_run(&g.thread("bob"));
    let id = EventId::generate();
    let with_id = |command: Command| Submission {
        event_id: Some(id),
        ..Submission::new(command)
    };
    g.when(
        &agent(),
        &[with_id(event(&run_a, AgentEventKind::Thinking))],
        now(),
    )
    .unwrap();
    let head = g.log.head();
    let err = |actor: &Actor, command: Command| match g
        .when(actor, &[with_id(command)], now())
        .unwrap_err()
    {
        SubmitError::Domain { error, .. } => error.code(),
        other => panic!("{other:?}"),
    };
    // Role first, then existence, then the id.
    assert_eq!(
        err(&user("bob"), event(&run_a, AgentEventKind::Thinking)),
        "forbidden"
    );
    assert_eq!(
        err(
            &agent(),
            event(&RunId::generate(), AgentEventKind::Thinking)
        ),
        "run_not_found"
    );
    assert_eq!(
        err(&agent(), event(&run_b, AgentEventKind::Thinking)),
        "event_id_conflict"
    );
    assert_eq!(
        err(&agent(), event(&run_a, AgentEventKind::Error)),
        "event_id_conflict"
    );
    // The same id twice in one batch for different events: refused whole.
    let fresh = EventId::generate();
    let twice = [run_a.clone(), run_b.clone()].map(|r| Submission {
        event_id: Some(fresh),
        ..Submission::new(event(&r, AgentEventKind::Thinking))
    });
    assert!(matches!(
        g.when(&agent(), &twice, now()).unwrap_err(),
        SubmitError::Domain {
            index: 1,
            error: DomainError::EventIdConflict(_)
        }
    ));
    assert_eq!(g.log.head(), head, "a refused submission appended");
}

#[test]
fn if_match_conflicts_name_the_current_version() {
    let g = given();
    let run = g.started_run(&g.thread("alice"));
    let stale = Submission {
        expected_thread_version: Some(1),
        ..Submission::new(event(&run, AgentEventKind::Thinking))
    };
    assert_eq!(
        g.when(&agent(), &[stale], now()).unwrap_err(),
        SubmitError::VersionConflict {
            index: 0,
            expected: 1,
            current: 3
        }
    );
    let fresh = Submission {
        expected_thread_version: Some(3),
        ..Submission::new(event(&run, AgentEventKind::Thinking))
    };
    assert_eq!(
        g.when(&agent(), &[fresh], now()).unwrap()[0]
            .as_ref()
            .unwrap()
            .thread_version,
        4
    );
}

#[test]
fn if_match_on_a_hidden_thread_is_not_found_not_a_conflict() {
    let g = given();
    let thread = g.thread("alice");
    let register = |version| Submission {
        expected_thread_version: Some(version),
        ..Submission::new(Command::RegisterRun {
            thread_id: thread.clone(),
            run_id: RunId::generate(),
            agent_name: "a".into(),
        })
    };
    // Bob must not learn that Alice's thread exists, let alone its version.
    assert_eq!(
        g.when(&user("bob"), &[register(7)], now()).unwrap_err(),
        SubmitError::Domain {
            index: 0,
            error: DomainError::ThreadNotFound(thread.clone())
        }
    );
    // Alice herself gets the conflict.
    assert!(matches!(
        g.when(&user("alice"), &[register(7)], now()).unwrap_err(),
        SubmitError::VersionConflict { current: 1, .. }
    ));
}

#[test]
fn a_batch_is_appended_all_or_none_and_names_the_failing_index() {
    let g = given();
    let run = g.started_run(&g.thread("alice"));
    let head = g.log.head();
    let batch = [
        Submission::new(event(&run, AgentEventKind::Thinking)),
        Submission::new(event(&run, AgentEventKind::Completed)),
        Submission::new(event(&run, AgentEventKind::Thinking)), // after a terminal event
    ];
    let err = g.when(&agent(), &batch, now()).unwrap_err();
    assert_eq!(
        err,
        SubmitError::Domain {
            index: 2,
            error: DomainError::RunClosed(run.clone())
        }
    );
    assert_eq!(g.log.head(), head);
    let ok = g.when(&agent(), &batch[..2], now()).unwrap();
    assert_eq!(
        ok.iter()
            .map(|o| o.as_ref().unwrap().position.0)
            .collect::<Vec<_>>(),
        vec![4, 5]
    );
}

#[test]
fn an_idle_run_is_expired_by_an_appended_event() {
    let g = given();
    let run = g.started_run(&g.thread("alice"));
    let late = now() + g.limits.run_ttl_ms + 1;
    let err = g
        .when(
            &agent(),
            &[Submission::new(event(&run, AgentEventKind::Thinking))],
            late,
        )
        .unwrap_err();
    assert_eq!(
        err,
        SubmitError::Domain {
            index: 0,
            error: DomainError::RunExpired(run.clone())
        }
    );
    let last = g.log.read_at(g.log.head()).unwrap().unwrap();
    assert_eq!(last.event_type, "run_expired");
    assert_eq!(last.actor, "system:system");
    assert_eq!(
        g.projector
            .read(|m| m.registry().run(&run).unwrap().status.as_str()),
        "expired"
    );
}

#[test]
fn cursors_only_move_forward() {
    let g = given();
    g.thread("alice");
    let alice = UserId::parse("alice").unwrap();
    let ack = |seq| Command::AcknowledgeDelivery {
        user_id: alice.clone(),
        client_id: ClientId::default_client(),
        user_seq: seq,
    };
    g.ok(&user("alice"), ack(5));
    g.ok(&user("alice"), ack(2));
    assert_eq!(
        g.projector
            .read(|m| m.delivery().cursor(&alice, &ClientId::default_client())),
        5
    );
    // Another user cannot move Alice's cursor.
    let err = g
        .when(&user("bob"), &[Submission::new(ack(9))], now())
        .unwrap_err();
    assert!(matches!(
        err,
        SubmitError::Domain {
            error: DomainError::Forbidden(_),
            ..
        }
    ));
}

#[test]
fn the_ledger_keeps_each_forward_ack_and_answers_which_covered_an_event() {
    let g = given();
    g.thread("alice");
    let alice = UserId::parse("alice").unwrap();
    let phone = ClientId::parse("phone").unwrap();
    let ack = |client: &ClientId, seq| Command::AcknowledgeDelivery {
        user_id: alice.clone(),
        client_id: client.clone(),
        user_seq: seq,
    };
    let first = g.ok(&user("alice"), ack(&phone, 3)).position;
    g.ok(&user("alice"), ack(&phone, 2)); // behind the cursor: nothing to record
    g.ok(&user("alice"), ack(&phone, 3)); // not forward either
    let second = g.ok(&user("alice"), ack(&phone, 7)).position;
    g.ok(&user("alice"), ack(&ClientId::default_client(), 1));
    g.projector.read(|m| {
        let acks = m.acks();
        assert_eq!(acks.len(), 3, "only forward moves are held");
        let covering = |seq| acks.covering(&alice, &phone, seq).map(|a| a.position);
        assert_eq!(covering(1), Some(first.0));
        assert_eq!(covering(3), Some(first.0));
        assert_eq!(covering(4), Some(second.0));
        assert_eq!(covering(7), Some(second.0));
        assert_eq!(covering(8), None, "beyond the cursor: not acknowledged");
        let clients: Vec<(String, u64)> = acks
            .clients(&alice)
            .map(|(c, a)| (c.to_string(), a.user_seq))
            .collect();
        assert_eq!(clients, [("default".into(), 1), ("phone".into(), 7)]);
        assert_eq!(acks.clients(&UserId::parse("bob").unwrap()).count(), 0);
    });
}

#[test]
fn records_apply_in_order_exactly_once() {
    let g = given();
    g.thread("alice");
    let record = g.log.read_at(Position(1)).unwrap().unwrap();
    let mut model = ReadModel::default();
    model.apply(&record).unwrap();
    assert_eq!(
        model.apply(&record),
        Err(ProjectionError::OutOfOrder {
            at: Position(1),
            got: Position(1)
        })
    );
    let skipped = Record {
        position: Position(3),
        ..record
    };
    assert!(matches!(
        model.apply(&skipped),
        Err(ProjectionError::OutOfOrder { .. })
    ));
}

#[test]
fn an_undecodable_payload_names_its_position() {
    let log = MemoryLog::new();
    log.append(vec![NewEvent {
        event_id: uuid::Uuid::now_v7(),
        stream: "thread:x".into(),
        expected_version: None,
        actor: "agent:a".into(),
        event_type: "agent_thinking".into(),
        payload: vec![9, 9, 9],
    }])
    .wait()
    .unwrap();
    let err = rebuild(&log, |_, _| {}).unwrap_err();
    assert!(
        matches!(
            err,
            ProjectionError::Decode {
                position: Position(1),
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_checkpoint_ahead_of_the_log_is_refused() {
    let g = given();
    g.thread("alice");
    g.projector.checkpoint().unwrap();
    let empty = Arc::new(MemoryLog::new());
    threadline_projections::store_checkpoint(&*empty, &load_checkpoint(&*g.log).unwrap().unwrap())
        .unwrap();
    assert!(matches!(
        Projector::open(empty),
        Err(ProjectionError::Checkpoint(_))
    ));
}

#[test]
fn restart_resumes_from_the_checkpoint() {
    let g = given();
    let t = g.thread("alice");
    g.projector.checkpoint().unwrap();
    g.started_run(&t);
    let restarted = Projector::open(g.log.clone()).unwrap();
    assert_eq!(
        restarted.read(|m| m.digests()),
        g.projector.read(|m| m.digests())
    );
    let _ = encode_event; // the codec is exercised through submit
}

#[test]
fn thread_metadata_stays_in_the_log_not_in_the_model() {
    let g = given();
    let metadata = format!("{{\"k\":\"{}\"}}", "x".repeat(16_000));
    for _ in 0..20 {
        g.ok(
            &user("alice"),
            Command::CreateThread {
                thread_id: ThreadId::generate(),
                owner: UserId::parse("alice").unwrap(),
                title: Some("t".into()),
                metadata: Some(metadata.clone()),
            },
        );
    }
    // 20 × 16 KB of metadata were appended; the model holds none of it.
    let model = g.projector.read(|m| m.to_checkpoint()).len();
    assert!(model < 16 * 1024, "the model is {model} bytes");
}

#[test]
fn a_checkpoint_of_an_older_format_is_rebuilt_from_the_log() {
    use threadline_storage::Checkpoints;
    let g = given();
    let run = g.started_run(&g.thread("alice"));
    g.ok(&agent(), event(&run, AgentEventKind::Thinking));
    g.log
        .store_checkpoint(threadline_projections::CHECKPOINT_NAME, &[1, 0xde, 0xad])
        .unwrap();
    assert!(load_checkpoint(&*g.log).unwrap().is_none());
    let reopened = Projector::open(g.log.clone()).unwrap();
    assert_eq!(reopened.position(), g.log.head());
    assert_eq!(
        reopened.read(|m| m.digests()),
        g.projector.read(|m| m.digests())
    );
}

/// A log on which another writer always lands on the thread first: every append
/// of ours is preceded by a rival event on the same stream, so ours conflicts.
type Rivalled = threadline_storage::Intercepted<MemoryLog, Rival>;

#[derive(Debug)]
struct Rival {
    rival: Mutex<Option<(ThreadId, RunId)>>,
}

impl threadline_storage::Intercept<MemoryLog> for Rival {
    fn append(
        &self,
        inner: &MemoryLog,
        events: Vec<NewEvent>,
    ) -> threadline_storage::PendingAppend {
        let rival = self.rival.lock().unwrap().clone();
        if let (Some((thread_id, run_id)), Some(first)) = (rival, events.first()) {
            let event = threadline_engine::Event::AgentEventRecorded {
                thread_id,
                run_id,
                kind: AgentEventKind::Thinking,
                data: "{}".into(),
                tool_call_id: None,
            };
            let rival = NewEvent {
                event_id: uuid::Uuid::now_v7(),
                stream: first.stream.clone(),
                expected_version: None,
                actor: "agent:rival".into(),
                event_type: event.type_name().into(),
                payload: encode_event(&event),
            };
            let pending = inner.append(vec![rival]);
            // Waited for off the runtime thread this is called on.
            std::thread::scope(|s| s.spawn(|| pending.wait()).join())
                .unwrap()
                .unwrap();
        }
        inner.append(events)
    }
}

#[test]
fn a_write_that_loses_every_race_is_contended_and_appends_nothing() {
    let log: Arc<Rivalled> = Arc::new(threadline_storage::Intercepted::new(
        MemoryLog::new(),
        Rival {
            rival: Mutex::new(None),
        },
    ));
    let projector = Arc::new(Projector::open(log.clone()).unwrap());
    let _fold = projector.follow(CheckpointPolicy::default()).unwrap();
    let commands = CommandService::new(projector.clone(), Limits::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let submit = |actor: &Actor, command: Command| {
        rt.block_on(commands.submit(actor, &[Submission::new(command)], now()))
    };
    let thread_id = ThreadId::generate();
    let run_id = RunId::generate();
    submit(
        &user("alice"),
        Command::CreateThread {
            thread_id: thread_id.clone(),
            owner: UserId::parse("alice").unwrap(),
            title: None,
            metadata: None,
        },
    )
    .unwrap();
    submit(
        &agent(),
        Command::RegisterRun {
            thread_id: thread_id.clone(),
            run_id: run_id.clone(),
            agent_name: "a".into(),
        },
    )
    .unwrap();
    submit(&agent(), event(&run_id, AgentEventKind::Started)).unwrap();
    let before = log.head();

    *log.hooks.rival.lock().unwrap() = Some((thread_id, run_id.clone()));
    let result = submit(&agent(), event(&run_id, AgentEventKind::Completed));

    assert!(
        matches!(result, Err(SubmitError::Contended { attempts: 64 })),
        "{result:?}"
    );
    // Only the rivals landed: one per attempt, none of ours.
    let after = log.head();
    assert_eq!(after.0 - before.0, 64);
    let landed = log.read_from(before.next(), 100).unwrap();
    assert!(landed.iter().all(|r| r.actor == "agent:rival"));
}

/// Counts the appends handed to the log (each attempt of a submission is one).
#[derive(Debug, Default)]
struct Counting {
    appends: std::sync::atomic::AtomicUsize,
}

impl threadline_storage::Intercept<MemoryLog> for Counting {
    fn append(
        &self,
        inner: &MemoryLog,
        events: Vec<NewEvent>,
    ) -> threadline_storage::PendingAppend {
        self.appends
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        inner.append(events)
    }
}

#[test]
fn a_burst_on_one_thread_takes_turns_instead_of_racing() {
    let log = Arc::new(threadline_storage::Intercepted::new(
        MemoryLog::new(),
        Counting::default(),
    ));
    let projector = Arc::new(Projector::open(log.clone()).unwrap());
    let _fold = projector.follow(CheckpointPolicy::default()).unwrap();
    let commands = CommandService::new(projector.clone(), Limits::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let thread_id = ThreadId::generate();
    let run_id = RunId::generate();
    let setup = [
        (
            user("alice"),
            Command::CreateThread {
                thread_id: thread_id.clone(),
                owner: UserId::parse("alice").unwrap(),
                title: None,
                metadata: None,
            },
        ),
        (
            agent(),
            Command::RegisterRun {
                thread_id: thread_id.clone(),
                run_id: run_id.clone(),
                agent_name: "a".into(),
            },
        ),
        (agent(), event(&run_id, AgentEventKind::Started)),
    ];
    for (actor, command) in setup {
        rt.block_on(commands.submit(&actor, &[Submission::new(command)], now()))
            .unwrap();
    }
    let before = log.hooks.appends.load(std::sync::atomic::Ordering::SeqCst);

    const BURST: usize = 200;
    let mut versions = rt.block_on(async {
        let tasks: Vec<_> = (0..BURST)
            .map(|_| {
                let commands = commands.clone();
                let command = event(&run_id, AgentEventKind::Thinking);
                tokio::spawn(async move {
                    commands
                        .submit(&agent(), &[Submission::new(command)], now())
                        .await
                })
            })
            .collect();
        let mut versions = Vec::new();
        for t in tasks {
            let outcome = t.await.unwrap().unwrap().remove(0).unwrap();
            versions.push(outcome.thread_version);
        }
        versions
    });

    // Every submission landed on its first attempt: none was judged on a version
    // another one of this process had just taken.
    let appends = log.hooks.appends.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert_eq!(appends, BURST, "appends for {BURST} submissions");
    versions.sort_unstable();
    let expected: Vec<u64> = (4..4 + BURST as u64).collect();
    assert_eq!(versions, expected, "dense thread versions, each once");
}

#[test]
fn a_damaged_checkpoint_costs_a_rebuild_not_the_start() {
    let g = given();
    g.thread("alice");
    g.projector.checkpoint().unwrap();
    let live = g.projector.read(|m| m.digests());
    let mut bytes = threadline_storage::Checkpoints::load_checkpoint(
        &*g.log,
        threadline_projections::CHECKPOINT_NAME,
    )
    .unwrap()
    .unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    threadline_storage::Checkpoints::store_checkpoint(
        &*g.log,
        threadline_projections::CHECKPOINT_NAME,
        &bytes,
    )
    .unwrap();
    assert!(load_checkpoint(&*g.log).unwrap().is_none());
    let reopened = Projector::open(g.log.clone()).unwrap();
    assert_eq!(reopened.read(|m| m.digests()), live);
}

#[test]
fn verify_checks_to_the_head_folds_to_its_position_and_names_a_differing_model() {
    use threadline_projections::verify::{compare, Check};
    let g = given();
    let t = g.thread("alice");
    let run = g.started_run(&t);
    // The live model at P, then more writes past it (as while a server runs).
    let live = g.projector.read(ReadModel::clone);
    let at = live.position();
    for _ in 0..3 {
        g.ok(&agent(), event(&run, AgentEventKind::Thinking));
    }
    let head = g.log.head();
    assert!(head > at);

    // A checkpoint from before P is caught up to P and compared there.
    let mut early = ReadModel::default();
    early
        .apply(&g.log.read_at(Position(1)).unwrap().unwrap())
        .unwrap();
    let mut check = Check::new(Some(early), at);
    let mut progress = Vec::new();
    check.scan(&*g.log, head, |p| progress.push(p)).unwrap();
    let (mut findings, fresh) = check.finish("stored checkpoint");
    let fresh = fresh.unwrap();
    assert_eq!(fresh.position, at);
    assert_eq!(findings.checked, head);
    assert_eq!(progress.last(), Some(&head));
    compare(&mut findings, &fresh, &live.digests(), "live state");
    assert!(findings.problems.is_empty(), "{:?}", findings.problems);

    // A model that folded something else is named, projection by projection.
    let other = given();
    other.thread("bob");
    let (mut findings, fresh) = {
        let mut check = Check::new(None, at);
        check.scan(&*g.log, head, |_| {}).unwrap();
        check.finish("stored checkpoint")
    };
    let mut wrong = other.projector.read(|m| m.digests());
    wrong.position = at;
    compare(&mut findings, &fresh.unwrap(), &wrong, "live state");
    assert!(
        findings
            .problems
            .iter()
            .any(|p| p == "projection registry: live state differs from a rebuild from the log"),
        "{:?}",
        findings.problems
    );
}

fn system() -> Actor {
    Actor::system()
}

/// The outcome the webhook worker records about the pending nudge `p`.
fn nudge_outcome(p: &threadline_projections::PendingNudge, delivered: bool) -> Submission {
    Submission {
        event_id: Some(EventId::generate()),
        ..Submission::new(Command::RecordNudge(threadline_engine::NudgeRecord {
            user_id: p.user_id.clone(),
            thread_id: p.thread_id.clone(),
            run_id: p.run_id.clone(),
            subject_position: p.position,
            subject_user_seq: p.user_seq,
            subject_event: p.event.clone(),
            delivered,
            attempts: 1,
            status: Some(if delivered { 200 } else { 500 }),
            error: (!delivered).then(|| "the receiver answered 500".to_owned()),
        }))
    }
}

#[test]
fn completions_errors_and_questions_are_pending_until_acked_or_recorded() {
    let g = given();
    let alice = UserId::parse("alice").unwrap();
    let t = g.thread("alice");
    let run = g.started_run(&t);
    g.ok(&agent(), event(&run, AgentEventKind::Thinking));
    let asked = g.ok(
        &agent(),
        Command::AwaitInput {
            run_id: run.clone(),
            input_id: "q1".into(),
            options: vec![],
            data: "{}".into(),
        },
    );
    let done = g.ok(&agent(), event(&run, AgentEventKind::Completed));
    let other = g.started_run(&g.thread("alice"));
    let failed = g.ok(&agent(), event(&other, AgentEventKind::Error));

    // Only the three subjects are pending, each with its user_seq and type.
    let pending: Vec<_> = g.projector.read(|m| {
        m.nudges()
            .due(u64::MAX, 0, 100, |_| false)
            .0
            .into_iter()
            .map(|p| (p.position, p.user_seq, p.event, p.input_id))
            .collect()
    });
    assert_eq!(
        pending,
        vec![
            (
                asked.position.0,
                asked.user_seq.unwrap(),
                "agent_awaiting_input".to_owned(),
                Some("q1".to_owned())
            ),
            (
                done.position.0,
                done.user_seq.unwrap(),
                "agent_completed".to_owned(),
                None
            ),
            (
                failed.position.0,
                failed.user_seq.unwrap(),
                "agent_error".to_owned(),
                None
            ),
        ]
    );

    // Due only `after` past their recorded time; the next due time is reported.
    let recorded = g
        .projector
        .read(|m| m.nudges().get(asked.position.0).unwrap().recorded_at_ms);
    let (due, next) = g
        .projector
        .read(|m| m.nudges().due(recorded, 30_000, 100, |_| false));
    assert!(due.is_empty());
    assert_eq!(next, Some(recorded + 30_000));
    let (due, _) = g
        .projector
        .read(|m| m.nudges().due(recorded + 30_000, 30_000, 100, |_| false));
    assert_eq!(due.first().map(|p| p.position), Some(asked.position.0));
    // Taken ones are skipped; a limit is kept.
    let (due, _) = g
        .projector
        .read(|m| m.nudges().due(u64::MAX, 0, 1, |p| p == asked.position.0));
    assert_eq!(
        due.iter().map(|p| p.position).collect::<Vec<_>>(),
        [done.position.0]
    );

    // An ack from any device covers everything up to its user_seq.
    g.ok(
        &user("alice"),
        Command::AcknowledgeDelivery {
            user_id: alice.clone(),
            client_id: ClientId::parse("phone").unwrap(),
            user_seq: done.user_seq.unwrap(),
        },
    );
    let left: Vec<u64> = g.projector.read(|m| {
        m.nudges()
            .due(u64::MAX, 0, 100, |_| false)
            .0
            .iter()
            .map(|p| p.position)
            .collect()
    });
    assert_eq!(left, [failed.position.0]);

    // A recorded outcome resolves it: nothing is pending.
    let p = g
        .projector
        .read(|m| m.nudges().get(failed.position.0).cloned())
        .unwrap();
    g.when(&system(), &[nudge_outcome(&p, true)], now())
        .unwrap();
    assert!(g.projector.read(|m| m.nudges().is_empty()));
    // The nudge moved no thread version and reached nobody's queue.
    let head = g.projector.read(|m| m.delivery().user_head(&alice));
    assert_eq!(head, failed.user_seq.unwrap());

    // Rebuilt from the log, the projection is the same.
    let rebuilt = rebuild(&*g.log, |_, _| {}).unwrap();
    assert_eq!(rebuilt.digests(), g.projector.read(ReadModel::digests));
}

#[test]
fn a_subject_already_acked_is_not_pending_and_one_outcome_stands_per_subject() {
    let g = given();
    let alice = UserId::parse("alice").unwrap();
    let run = g.started_run(&g.thread("alice"));
    // A device acknowledged ahead (past the head): the completion is covered at once.
    g.ok(
        &user("alice"),
        Command::AcknowledgeDelivery {
            user_id: alice.clone(),
            client_id: ClientId::parse("laptop").unwrap(),
            user_seq: 100,
        },
    );
    g.ok(&agent(), event(&run, AgentEventKind::Completed));
    assert!(g.projector.read(|m| m.nudges().is_empty()));

    let bob_run = g.started_run(&g.thread("bob"));
    let done = g.ok(&agent(), event(&bob_run, AgentEventKind::Completed));
    let p = g
        .projector
        .read(|m| m.nudges().get(done.position.0).cloned())
        .unwrap();
    // Only the system records nudges.
    let refused = g.when(&agent(), &[nudge_outcome(&p, true)], now());
    assert!(
        matches!(
            refused,
            Err(SubmitError::Domain {
                error: DomainError::Forbidden(_),
                ..
            })
        ),
        "{refused:?}"
    );
    // The first outcome under the nudge's id stands; a second one is answered with it.
    let id = EventId::generate();
    let first = Submission {
        event_id: Some(id),
        ..nudge_outcome(&p, false)
    };
    let second = Submission {
        event_id: Some(id),
        ..nudge_outcome(&p, true)
    };
    let a = g
        .when(&system(), &[first], now())
        .unwrap()
        .remove(0)
        .unwrap();
    let b = g
        .when(&system(), &[second], now())
        .unwrap()
        .remove(0)
        .unwrap();
    assert!(!a.duplicate && b.duplicate);
    assert_eq!(a.position, b.position);
    assert_eq!(g.log.head(), a.position);
}

#[test]
fn a_user_holds_a_bounded_number_of_pending_nudges() {
    let g = given();
    let t = g.thread("carol");
    let mut last = None;
    for _ in 0..threadline_projections::MAX_PENDING_PER_USER + 3 {
        let run = g.started_run(&t);
        last = Some(g.ok(&agent(), event(&run, AgentEventKind::Completed)));
    }
    let (n, newest) = g.projector.read(|m| {
        (
            m.nudges().len(),
            m.nudges()
                .due(u64::MAX, 0, usize::MAX, |_| false)
                .0
                .last()
                .map(|p| p.position),
        )
    });
    assert_eq!(n, threadline_projections::MAX_PENDING_PER_USER);
    assert_eq!(newest, last.map(|o| o.position.0), "the oldest are dropped");
}
