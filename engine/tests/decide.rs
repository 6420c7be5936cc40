//! Given/when/then tests of every rule in `decide`, and of the registry fold.

use threadline_engine::{
    authorize, decide, Actor, AgentEventKind, ClientId, Command, DomainError, Event, EventId,
    EventMeta, Limits, Registry, Role, RunId, RunStatus, ThreadId, UserId,
};

const T0: u64 = 1_000_000;
const DAY: u64 = 24 * 60 * 60 * 1000;

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}
fn thread(s: &str) -> ThreadId {
    ThreadId::parse(s).unwrap()
}
fn run(s: &str) -> RunId {
    RunId::parse(s).unwrap()
}
fn as_user(s: &str) -> Actor {
    Actor::new(user(s), Role::User)
}
fn agent() -> Actor {
    Actor::new(user("bot"), Role::Agent)
}
fn auditor() -> Actor {
    Actor::new(user("aud"), Role::Auditor)
}

// ---- event and command builders ----

fn created(t: &str, owner: &str) -> Event {
    Event::ThreadCreated {
        thread_id: thread(t),
        owner: user(owner),
        title: None,
        metadata: None,
    }
}
fn registered(t: &str, r: &str) -> Event {
    Event::RunRegistered {
        thread_id: thread(t),
        run_id: run(r),
        agent_name: "planner".into(),
    }
}
fn recorded(t: &str, r: &str, kind: AgentEventKind, tool: Option<&str>) -> Event {
    Event::AgentEventRecorded {
        thread_id: thread(t),
        run_id: run(r),
        kind,
        data: "{}".into(),
        tool_call_id: tool.map(String::from),
    }
}
fn expired(t: &str, r: &str) -> Event {
    Event::RunExpired {
        thread_id: thread(t),
        run_id: run(r),
    }
}
fn create(t: &str, owner: &str) -> Command {
    Command::CreateThread {
        thread_id: thread(t),
        owner: user(owner),
        title: None,
        metadata: None,
    }
}
fn register(t: &str, r: &str) -> Command {
    Command::RegisterRun {
        thread_id: thread(t),
        run_id: run(r),
        agent_name: "planner".into(),
    }
}
fn record(r: &str, kind: AgentEventKind, tool: Option<&str>) -> Command {
    Command::RecordAgentEvent {
        run_id: run(r),
        kind,
        data: "{}".into(),
        tool_call_id: tool.map(String::from),
    }
}
fn expire(r: &str) -> Command {
    Command::ExpireRun { run_id: run(r) }
}
fn ack(u: &str, seq: u64) -> Command {
    Command::AcknowledgeDelivery {
        user_id: user(u),
        client_id: ClientId::default(),
        user_seq: seq,
    }
}

// ---- the harness ----

/// History applied at T0 with dense positions.
fn given(events: Vec<Event>) -> Given {
    let mut state = Registry::default();
    for (i, e) in events.iter().enumerate() {
        let meta = EventMeta {
            position: i as u64 + 1,
            recorded_at_ms: T0,
        };
        state.apply(e, &meta);
    }
    Given {
        state,
        now: T0,
        limits: Limits::default(),
    }
}

/// alice owns thread_a with a registered run_a; bob owns thread_b.
fn world() -> Vec<Event> {
    vec![
        created("thread_a", "alice"),
        created("thread_b", "bob"),
        registered("thread_a", "run_a"),
    ]
}

/// `world` plus run_a started.
fn running() -> Vec<Event> {
    let mut events = world();
    events.push(recorded("thread_a", "run_a", AgentEventKind::Started, None));
    events
}

fn with(mut events: Vec<Event>, more: impl IntoIterator<Item = Event>) -> Vec<Event> {
    events.extend(more);
    events
}

struct Given {
    state: Registry,
    now: u64,
    limits: Limits,
}

struct Outcome(Result<Vec<Event>, DomainError>);

impl Given {
    fn at(mut self, now: u64) -> Self {
        self.now = now;
        self
    }
    fn when(&self, actor: Actor, command: Command) -> Outcome {
        Outcome(decide(&self.state, &actor, command, self.now, &self.limits))
    }
}

impl Outcome {
    #[track_caller]
    fn then_ok(self, expected: Vec<Event>) {
        assert_eq!(self.0, Ok(expected));
    }
    #[track_caller]
    fn then_err(self, expected: DomainError) {
        assert_eq!(self.0, Err(expected));
    }
    #[track_caller]
    fn then_code(self, code: &str) {
        match self.0 {
            Err(e) => assert_eq!(e.code(), code, "{e}"),
            Ok(events) => panic!("expected {code}, got {events:?}"),
        }
    }
}

// ---- roles ----

#[test]
fn auditors_may_not_issue_any_command() {
    for cmd in [
        create("thread_n", "aud"),
        register("thread_a", "run_n"),
        record("run_a", AgentEventKind::Thinking, None),
        expire("run_a"),
        ack("aud", 1),
    ] {
        given(running()).when(auditor(), cmd).then_code("forbidden");
    }
}

#[test]
fn system_may_only_expire_runs() {
    for cmd in [
        create("thread_n", "system"),
        register("thread_a", "run_n"),
        record("run_a", AgentEventKind::Thinking, None),
        ack("system", 1),
    ] {
        given(running())
            .when(Actor::system(), cmd)
            .then_code("forbidden");
    }
    given(running())
        .at(T0 + DAY + 1)
        .when(Actor::system(), expire("run_a"))
        .then_ok(vec![expired("thread_a", "run_a")]);
}

// ---- CreateThread ----

#[test]
fn user_creates_own_thread() {
    let cmd = Command::CreateThread {
        thread_id: thread("thread_n"),
        owner: user("alice"),
        title: Some("Hello".into()),
        metadata: Some(r#"{"k":1}"#.into()),
    };
    let expected = Event::ThreadCreated {
        thread_id: thread("thread_n"),
        owner: user("alice"),
        title: Some("Hello".into()),
        metadata: Some(r#"{"k":1}"#.into()),
    };
    given(world())
        .when(as_user("alice"), cmd)
        .then_ok(vec![expected]);
}

#[test]
fn user_may_not_create_for_someone_else() {
    given(world())
        .when(as_user("alice"), create("thread_n", "bob"))
        .then_code("forbidden");
}

#[test]
fn agent_creates_for_any_owner() {
    given(world())
        .when(agent(), create("thread_n", "carol"))
        .then_ok(vec![created("thread_n", "carol")]);
}

#[test]
fn existing_thread_id_is_rejected() {
    given(world())
        .when(as_user("alice"), create("thread_a", "alice"))
        .then_err(DomainError::ThreadExists(thread("thread_a")));
}

#[test]
fn title_is_limited_in_chars_not_bytes() {
    let limits = Limits::default();
    let at_limit = "é".repeat(limits.max_title_chars);
    let over = "é".repeat(limits.max_title_chars + 1);
    let cmd = |title: &str| Command::CreateThread {
        thread_id: thread("thread_n"),
        owner: user("alice"),
        title: Some(title.into()),
        metadata: None,
    };
    assert!(given(world())
        .when(as_user("alice"), cmd(&at_limit))
        .0
        .is_ok());
    given(world())
        .when(as_user("alice"), cmd(&over))
        .then_err(DomainError::TooLarge {
            what: "title",
            limit: 512,
        });
}

#[test]
fn metadata_over_limit_is_rejected() {
    let cmd = Command::CreateThread {
        thread_id: thread("thread_n"),
        owner: user("alice"),
        title: None,
        metadata: Some("x".repeat(16 * 1024 + 1)),
    };
    given(world())
        .when(as_user("alice"), cmd)
        .then_err(DomainError::TooLarge {
            what: "metadata",
            limit: 16 * 1024,
        });
}

// ---- RegisterRun ----

#[test]
fn user_registers_run_on_own_thread() {
    given(world())
        .when(as_user("alice"), register("thread_a", "run_n"))
        .then_ok(vec![registered("thread_a", "run_n")]);
}

#[test]
fn another_users_thread_looks_missing() {
    let foreign = given(world())
        .when(as_user("alice"), register("thread_b", "run_n"))
        .0;
    let missing = given(world())
        .when(as_user("alice"), register("thread_zz", "run_n"))
        .0;
    assert_eq!(
        foreign,
        Err(DomainError::ThreadNotFound(thread("thread_b")))
    );
    assert_eq!(
        missing,
        Err(DomainError::ThreadNotFound(thread("thread_zz")))
    );
}

#[test]
fn agent_registers_on_any_thread() {
    given(world())
        .when(agent(), register("thread_b", "run_n"))
        .then_ok(vec![registered("thread_b", "run_n")]);
}

#[test]
fn agent_on_missing_thread_gets_not_found() {
    given(world())
        .when(agent(), register("thread_zz", "run_n"))
        .then_err(DomainError::ThreadNotFound(thread("thread_zz")));
}

#[test]
fn run_id_is_unique_across_threads() {
    given(world())
        .when(agent(), register("thread_b", "run_a"))
        .then_err(DomainError::RunExists(run("run_a")));
    given(world())
        .when(as_user("alice"), register("thread_a", "run_a"))
        .then_err(DomainError::RunExists(run("run_a")));
}

#[test]
fn agent_name_must_be_present_and_bounded() {
    let cmd = |name: String| Command::RegisterRun {
        thread_id: thread("thread_a"),
        run_id: run("run_n"),
        agent_name: name,
    };
    given(world())
        .when(agent(), cmd(String::new()))
        .then_code("invalid_request");
    given(world())
        .when(agent(), cmd("  ".into()))
        .then_code("invalid_request");
    given(world())
        .when(agent(), cmd("n".repeat(129)))
        .then_err(DomainError::TooLarge {
            what: "agent_name",
            limit: 128,
        });
    assert!(given(world()).when(agent(), cmd("n".repeat(128))).0.is_ok());
}

// ---- RecordAgentEvent ----

#[test]
fn only_agents_record_agent_events() {
    given(running())
        .when(
            as_user("alice"),
            record("run_a", AgentEventKind::Thinking, None),
        )
        .then_code("forbidden");
}

#[test]
fn recording_on_missing_run_is_not_found() {
    given(world())
        .when(agent(), record("run_zz", AgentEventKind::Started, None))
        .then_err(DomainError::RunNotFound(run("run_zz")));
}

#[test]
fn data_over_limit_is_rejected() {
    let cmd = |n: usize| Command::RecordAgentEvent {
        run_id: run("run_a"),
        kind: AgentEventKind::Thinking,
        data: "x".repeat(n),
        tool_call_id: None,
    };
    given(running())
        .when(agent(), cmd(65_537))
        .then_err(DomainError::TooLarge {
            what: "data",
            limit: 65_536,
        });
    assert!(given(running()).when(agent(), cmd(65_536)).0.is_ok());
}

#[test]
fn started_is_recorded_on_the_runs_thread() {
    given(world())
        .when(agent(), record("run_a", AgentEventKind::Started, None))
        .then_ok(vec![recorded(
            "thread_a",
            "run_a",
            AgentEventKind::Started,
            None,
        )]);
}

#[test]
fn started_must_come_first() {
    for kind in [
        AgentEventKind::Thinking,
        AgentEventKind::ToolExecuting,
        AgentEventKind::ToolCompleted,
        AgentEventKind::Completed,
        AgentEventKind::Error,
    ] {
        given(world())
            .when(agent(), record("run_a", kind, None))
            .then_err(DomainError::InvalidLifecycle(
                "agent_started must come first".into(),
            ));
    }
}

#[test]
fn started_twice_is_invalid() {
    given(running())
        .when(agent(), record("run_a", AgentEventKind::Started, None))
        .then_code("invalid_lifecycle");
}

#[test]
fn closed_runs_accept_nothing() {
    for terminal in [AgentEventKind::Completed, AgentEventKind::Error] {
        let history = with(running(), [recorded("thread_a", "run_a", terminal, None)]);
        given(history)
            .when(agent(), record("run_a", AgentEventKind::Thinking, None))
            .then_err(DomainError::RunClosed(run("run_a")));
    }
}

#[test]
fn expired_runs_accept_nothing() {
    given(with(running(), [expired("thread_a", "run_a")]))
        .when(agent(), record("run_a", AgentEventKind::Thinking, None))
        .then_err(DomainError::RunExpired(run("run_a")));
}

#[test]
fn idle_open_runs_count_as_expired() {
    given(running())
        .at(T0 + DAY + 1)
        .when(agent(), record("run_a", AgentEventKind::Thinking, None))
        .then_err(DomainError::RunExpired(run("run_a")));
    given(world())
        .at(T0 + DAY + 1)
        .when(agent(), record("run_a", AgentEventKind::Started, None))
        .then_err(DomainError::RunExpired(run("run_a")));
    // Exactly at the TTL the run is still alive.
    assert!(given(running())
        .at(T0 + DAY)
        .when(agent(), record("run_a", AgentEventKind::Thinking, None))
        .0
        .is_ok());
}

#[test]
fn tool_calls_must_pair_up() {
    let open = with(
        running(),
        [recorded(
            "thread_a",
            "run_a",
            AgentEventKind::ToolExecuting,
            Some("t1"),
        )],
    );
    given(open.clone())
        .when(
            agent(),
            record("run_a", AgentEventKind::ToolExecuting, Some("t1")),
        )
        .then_code("invalid_lifecycle");
    given(open.clone())
        .when(
            agent(),
            record("run_a", AgentEventKind::ToolCompleted, Some("t2")),
        )
        .then_code("invalid_lifecycle");
    given(open.clone())
        .when(
            agent(),
            record("run_a", AgentEventKind::ToolCompleted, Some("t1")),
        )
        .then_ok(vec![recorded(
            "thread_a",
            "run_a",
            AgentEventKind::ToolCompleted,
            Some("t1"),
        )]);
    // Completing closes the call, so completing it again has nothing to match.
    let closed = with(
        open,
        [recorded(
            "thread_a",
            "run_a",
            AgentEventKind::ToolCompleted,
            Some("t1"),
        )],
    );
    given(closed)
        .when(
            agent(),
            record("run_a", AgentEventKind::ToolCompleted, Some("t1")),
        )
        .then_code("invalid_lifecycle");
}

#[test]
fn tool_events_without_an_id_are_untracked() {
    for kind in [AgentEventKind::ToolExecuting, AgentEventKind::ToolCompleted] {
        given(running())
            .when(agent(), record("run_a", kind, None))
            .then_ok(vec![recorded("thread_a", "run_a", kind, None)]);
    }
}

#[test]
fn a_running_run_may_end() {
    for kind in [AgentEventKind::Completed, AgentEventKind::Error] {
        given(running())
            .when(agent(), record("run_a", kind, None))
            .then_ok(vec![recorded("thread_a", "run_a", kind, None)]);
    }
}

// ---- ExpireRun ----

#[test]
fn users_may_not_expire_runs() {
    given(running())
        .at(T0 + DAY + 1)
        .when(as_user("alice"), expire("run_a"))
        .then_code("forbidden");
}

#[test]
fn expiring_a_missing_run_is_not_found() {
    given(world())
        .when(agent(), expire("run_zz"))
        .then_err(DomainError::RunNotFound(run("run_zz")));
}

#[test]
fn agent_expires_an_idle_run() {
    given(world())
        .at(T0 + DAY + 1)
        .when(agent(), expire("run_a"))
        .then_ok(vec![expired("thread_a", "run_a")]);
}

#[test]
fn expiring_is_a_no_op_when_nothing_to_do() {
    given(running())
        .at(T0 + DAY)
        .when(Actor::system(), expire("run_a"))
        .then_ok(vec![]);
    for done in [
        recorded("thread_a", "run_a", AgentEventKind::Completed, None),
        recorded("thread_a", "run_a", AgentEventKind::Error, None),
        expired("thread_a", "run_a"),
    ] {
        given(with(running(), [done]))
            .at(T0 + 10 * DAY)
            .when(Actor::system(), expire("run_a"))
            .then_ok(vec![]);
    }
}

// ---- AcknowledgeDelivery ----

#[test]
fn user_acknowledges_own_delivery() {
    given(world())
        .when(as_user("alice"), ack("alice", 7))
        .then_ok(vec![Event::CursorAdvanced {
            user_id: user("alice"),
            client_id: ClientId::default(),
            user_seq: 7,
        }]);
}

#[test]
fn only_the_user_itself_acknowledges() {
    given(world())
        .when(as_user("bob"), ack("alice", 7))
        .then_code("forbidden");
    given(world())
        .when(agent(), ack("bot", 7))
        .then_code("forbidden");
}

#[test]
fn user_seq_zero_is_invalid() {
    given(world())
        .when(as_user("alice"), ack("alice", 0))
        .then_code("invalid_request");
}

// ---- Registry::apply ----

#[test]
fn apply_keeps_thread_versions_dense_and_counts_runs() {
    let history = with(
        world(),
        [
            recorded("thread_a", "run_a", AgentEventKind::Started, None),
            Event::CursorAdvanced {
                user_id: user("alice"),
                client_id: ClientId::default(),
                user_seq: 1,
            },
            recorded(
                "thread_a",
                "run_a",
                AgentEventKind::ToolExecuting,
                Some("t1"),
            ),
            registered("thread_a", "run_c"),
            registered("thread_b", "run_b"),
            recorded("thread_a", "run_a", AgentEventKind::Completed, None),
        ],
    );
    let state = given(history).state;

    let a = state.thread(&thread("thread_a")).unwrap();
    // created, run_a, started, tool, run_c, completed; the cursor event is not on the thread.
    assert_eq!(a.version, 6);
    assert_eq!(a.last_position, 9);
    assert_eq!(a.runs, vec![run("run_a"), run("run_c")]);
    let b = state.thread(&thread("thread_b")).unwrap();
    assert_eq!((b.version, b.runs.len(), b.last_position), (2, 1, 8));

    let ra = state.run(&run("run_a")).unwrap();
    assert_eq!(ra.status, RunStatus::Completed);
    assert_eq!(ra.last_event.as_deref(), Some("agent_completed"));
    assert!(ra.open_tool_calls.contains("t1"));
    assert_eq!(
        state.run(&run("run_c")).unwrap().status,
        RunStatus::Registered
    );

    let owned: Vec<_> = state
        .threads_of(&user("alice"))
        .map(|t| &t.thread_id)
        .collect();
    assert_eq!(owned, vec![&thread("thread_a")]);
    assert_eq!(state.owner_of(&thread("thread_b")), Some(&user("bob")));
    assert_eq!(state.users().count(), 2);
    assert_eq!(state.threads().count(), 2);
}

#[test]
fn expirable_runs_are_the_idle_open_ones() {
    let history = with(
        running(),
        [
            registered("thread_b", "run_b"),
            registered("thread_b", "run_done"),
            recorded("thread_b", "run_done", AgentEventKind::Started, None),
            recorded("thread_b", "run_done", AgentEventKind::Completed, None),
        ],
    );
    let state = given(history).state;
    assert!(state.expirable_runs(T0 + DAY, DAY).is_empty());
    assert_eq!(
        state.expirable_runs(T0 + DAY + 1, DAY),
        vec![run("run_a"), run("run_b")]
    );
    // A clock behind the last activity never expires anything.
    assert!(state.expirable_runs(0, DAY).is_empty());
}

#[test]
fn every_error_has_its_code() {
    let cases = [
        (DomainError::Forbidden("x".into()), "forbidden"),
        (
            DomainError::ThreadNotFound(thread("thread_a")),
            "thread_not_found",
        ),
        (DomainError::RunNotFound(run("run_a")), "run_not_found"),
        (
            DomainError::ThreadExists(thread("thread_a")),
            "thread_exists",
        ),
        (DomainError::RunExists(run("run_a")), "run_exists"),
        (DomainError::RunClosed(run("run_a")), "run_closed"),
        (DomainError::RunExpired(run("run_a")), "run_expired"),
        (
            DomainError::InvalidLifecycle("x".into()),
            "invalid_lifecycle",
        ),
        (
            DomainError::TooLarge {
                what: "data",
                limit: 1,
            },
            "payload_too_large",
        ),
        (DomainError::InvalidInput("x".into()), "invalid_request"),
        (
            DomainError::EventIdConflict(EventId::generate()),
            "event_id_conflict",
        ),
        (
            DomainError::QuotaExceeded {
                what: "threads per user",
                limit: 1,
            },
            "quota_exceeded",
        ),
        (ThreadId::parse("").unwrap_err().into(), "invalid_id"),
    ];
    for (err, code) in cases {
        assert_eq!(err.code(), code);
        assert!(!err.to_string().is_empty());
    }
}

#[test]
fn event_names_and_streams() {
    assert_eq!(created("thread_a", "alice").type_name(), "thread_created");
    assert_eq!(created("thread_a", "alice").stream(), "thread:thread_a");
    assert_eq!(
        registered("thread_a", "run_a").run_id(),
        Some(&run("run_a"))
    );
    assert_eq!(expired("thread_a", "run_a").type_name(), "run_expired");
    let cursor = Event::CursorAdvanced {
        user_id: user("alice"),
        client_id: ClientId::default(),
        user_seq: 3,
    };
    assert_eq!(cursor.stream(), "cursor:alice:default");
    assert_eq!(cursor.thread_id(), None);
    for kind in AgentEventKind::ALL {
        assert_eq!(AgentEventKind::parse(kind.as_str()), Some(kind));
    }
    assert_eq!(AgentEventKind::parse("agent_paused"), None);
    assert!(AgentEventKind::Completed.is_terminal() && !AgentEventKind::Thinking.is_terminal());
}

// ---- idempotency: who may hear a repeat, and what is a repeat ----

#[test]
fn authorize_is_decides_first_step() {
    let g = given(running());
    let cases = [
        (auditor(), record("run_a", AgentEventKind::Thinking, None)),
        (
            as_user("bob"),
            record("run_a", AgentEventKind::Thinking, None),
        ),
        (
            as_user("bob"),
            record("run_missing", AgentEventKind::Thinking, None),
        ),
        (
            agent(),
            record("run_missing", AgentEventKind::Thinking, None),
        ),
        (as_user("bob"), register("thread_a", "run_new")),
        (as_user("alice"), create("thread_new", "bob")),
        (as_user("alice"), ack("bob", 1)),
        (as_user("alice"), expire("run_a")),
    ];
    for (actor, command) in cases {
        let refused = authorize(&g.state, &actor, &command).unwrap_err();
        assert_eq!(g.when(actor, command).0, Err(refused));
    }
    // Passing authorize says nothing of the rest: an agent on a closed run is authorized.
    let closed = given(with(
        running(),
        [recorded(
            "thread_a",
            "run_a",
            AgentEventKind::Completed,
            None,
        )],
    ));
    let again = record("run_a", AgentEventKind::Thinking, None);
    assert_eq!(authorize(&closed.state, &agent(), &again), Ok(()));
    closed.when(agent(), again).then_code("run_closed");
}

#[test]
fn a_repeat_is_the_same_run_type_and_data() {
    let original = recorded(
        "thread_a",
        "run_a",
        AgentEventKind::ToolExecuting,
        Some("t1"),
    );
    let same = record("run_a", AgentEventKind::ToolExecuting, Some("t1"));
    assert!(same.repeats(&original));
    let other_run = record("run_b", AgentEventKind::ToolExecuting, Some("t1"));
    let other_kind = record("run_a", AgentEventKind::Thinking, Some("t1"));
    let other_tool = record("run_a", AgentEventKind::ToolExecuting, Some("t2"));
    let other_data = Command::RecordAgentEvent {
        run_id: run("run_a"),
        kind: AgentEventKind::ToolExecuting,
        data: "{\"x\":1}".into(),
        tool_call_id: Some("t1".into()),
    };
    for c in [other_run, other_kind, other_tool, other_data] {
        assert!(!c.repeats(&original), "{c:?}");
    }
    assert!(create("thread_a", "alice").repeats(&created("thread_a", "alice")));
    assert!(!create("thread_a", "bob").repeats(&created("thread_a", "alice")));
    assert!(register("thread_a", "run_a").repeats(&registered("thread_a", "run_a")));
    assert!(!register("thread_a", "run_a").repeats(&original));
    assert!(expire("run_a").repeats(&expired("thread_a", "run_a")));
}

// ---- quotas ----

#[test]
fn a_user_owns_at_most_max_threads_per_user() {
    let mut g = given(world());
    g.limits.max_threads_per_user = 1;
    g.when(as_user("alice"), create("thread_c", "alice"))
        .then_err(DomainError::QuotaExceeded {
            what: "threads per user",
            limit: 1,
        });
    g.when(agent(), create("thread_c", "alice"))
        .then_code("quota_exceeded");
    g.when(agent(), create("thread_c", "carol"))
        .then_ok(vec![created("thread_c", "carol")]);
    // The quota travels with the scratch copy decide judges batches on.
    let scratch = g.state.subset([], [], [&user("alice")]);
    assert_eq!(scratch.thread_count(&user("alice")), 1);
}

#[test]
fn tool_call_ids_and_open_tool_calls_are_bounded() {
    let mut g = given(running());
    g.limits.max_tool_call_id_bytes = 8;
    g.limits.max_open_tool_calls = 1;
    g.when(
        agent(),
        record("run_a", AgentEventKind::ToolExecuting, Some("123456789")),
    )
    .then_code("payload_too_large");
    let g = Given {
        state: given(with(
            running(),
            [recorded(
                "thread_a",
                "run_a",
                AgentEventKind::ToolExecuting,
                Some("t1"),
            )],
        ))
        .state,
        ..g
    };
    g.when(
        agent(),
        record("run_a", AgentEventKind::ToolExecuting, Some("t2")),
    )
    .then_err(DomainError::QuotaExceeded {
        what: "open tool calls per run",
        limit: 1,
    });
    // Completing one, or an event without a tool call id, is not limited.
    g.when(
        agent(),
        record("run_a", AgentEventKind::ToolCompleted, Some("t1")),
    )
    .then_ok(vec![recorded(
        "thread_a",
        "run_a",
        AgentEventKind::ToolCompleted,
        Some("t1"),
    )]);
    g.when(agent(), record("run_a", AgentEventKind::Thinking, None))
        .then_ok(vec![recorded(
            "thread_a",
            "run_a",
            AgentEventKind::Thinking,
            None,
        )]);
}
