//! Given/when/then tests of the way back from user to agent (issue 19):
//! cancel requests, inputs the agent awaits and the owner's answers.

use threadline_engine::{
    decide, Actor, AgentEventKind, Command, DomainError, Event, EventMeta, Limits, Registry, Role,
    RunId, ThreadId, UserId,
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

fn recorded(kind: AgentEventKind) -> Event {
    Event::AgentEventRecorded {
        thread_id: thread("thread_a"),
        run_id: run("run_a"),
        kind,
        data: "{}".into(),
        tool_call_id: None,
    }
}
fn requested(input: &str, options: &[&str]) -> Event {
    Event::InputRequested {
        thread_id: thread("thread_a"),
        run_id: run("run_a"),
        input_id: input.into(),
        options: options.iter().map(|o| o.to_string()).collect(),
        data: "{}".into(),
    }
}
fn await_input(input: &str, options: &[&str]) -> Command {
    Command::AwaitInput {
        run_id: run("run_a"),
        input_id: input.into(),
        options: options.iter().map(|o| o.to_string()).collect(),
        data: "{}".into(),
    }
}
fn cancel() -> Command {
    Command::RequestCancel {
        run_id: run("run_a"),
        reason: Some("changed my mind".into()),
    }
}
fn cancelled_by(u: &str) -> Event {
    Event::RunCancelRequested {
        thread_id: thread("thread_a"),
        run_id: run("run_a"),
        requested_by: user(u),
        reason: Some("changed my mind".into()),
    }
}
fn answer(input: &str, a: &str) -> Command {
    Command::ProvideInput {
        run_id: run("run_a"),
        input_id: input.into(),
        answer: a.into(),
    }
}
fn answered(input: &str, a: &str) -> Event {
    Event::InputProvided {
        thread_id: thread("thread_a"),
        run_id: run("run_a"),
        input_id: input.into(),
        answered_by: user("alice"),
        answer: a.into(),
    }
}

/// alice owns thread_a with run_a started; bob owns thread_b.
fn running() -> Vec<Event> {
    vec![
        Event::ThreadCreated {
            thread_id: thread("thread_a"),
            owner: user("alice"),
            title: None,
            metadata: None,
        },
        Event::ThreadCreated {
            thread_id: thread("thread_b"),
            owner: user("bob"),
            title: None,
            metadata: None,
        },
        Event::RunRegistered {
            thread_id: thread("thread_a"),
            run_id: run("run_a"),
            agent_name: "planner".into(),
        },
        recorded(AgentEventKind::Started),
    ]
}
fn with(mut events: Vec<Event>, more: impl IntoIterator<Item = Event>) -> Vec<Event> {
    events.extend(more);
    events
}

fn given(events: Vec<Event>) -> Registry {
    let mut state = Registry::default();
    for (i, e) in events.iter().enumerate() {
        state.apply(
            e,
            &EventMeta {
                position: i as u64 + 1,
                recorded_at_ms: T0,
            },
        );
    }
    state
}

fn when(state: &Registry, actor: Actor, command: Command) -> Result<Vec<Event>, DomainError> {
    decide(state, &actor, command, T0, &Limits::default())
}

#[track_caller]
fn code(result: Result<Vec<Event>, DomainError>) -> &'static str {
    match result {
        Err(e) => e.code(),
        Ok(events) => panic!("expected an error, got {events:?}"),
    }
}

// ---- cancel ----

#[test]
fn the_owner_cancels_a_running_run_and_is_recorded_as_who_asked() {
    let state = given(running());
    assert_eq!(
        when(&state, as_user("alice"), cancel()),
        Ok(vec![cancelled_by("alice")])
    );
}

#[test]
fn a_cancel_is_recorded_once_and_raises_the_runs_signals() {
    let state = given(with(running(), [cancelled_by("alice")]));
    let r = state.run(&run("run_a")).unwrap();
    assert_eq!(r.signals, 1);
    let c = r.cancel.as_ref().unwrap();
    assert_eq!((c.by.as_str(), c.at_ms, c.position), ("alice", T0, 5));
    // Asking again changes nothing: the first request stands.
    assert_eq!(when(&state, as_user("alice"), cancel()), Ok(vec![]));
}

#[test]
fn another_users_run_cannot_be_cancelled_and_does_not_leak() {
    let state = given(running());
    assert_eq!(
        code(when(&state, as_user("bob"), cancel())),
        "run_not_found"
    );
    let missing = Command::RequestCancel {
        run_id: run("run_zz"),
        reason: None,
    };
    assert_eq!(code(when(&state, as_user("bob"), missing)), "run_not_found");
}

#[test]
fn agents_and_auditors_may_not_cancel() {
    let state = given(running());
    assert_eq!(code(when(&state, agent(), cancel())), "forbidden");
    let auditor = Actor::new(user("aud"), Role::Auditor);
    assert_eq!(code(when(&state, auditor, cancel())), "forbidden");
}

#[test]
fn a_finished_run_cannot_be_cancelled() {
    for (terminal, expected) in [
        (recorded(AgentEventKind::Completed), "run_closed"),
        (recorded(AgentEventKind::Error), "run_closed"),
        (
            Event::RunExpired {
                thread_id: thread("thread_a"),
                run_id: run("run_a"),
            },
            "run_expired",
        ),
    ] {
        let state = given(with(running(), [terminal]));
        assert_eq!(code(when(&state, as_user("alice"), cancel())), expected);
    }
    // An idle run is already dead, before the sweeper records it.
    let state = given(running());
    let idle = decide(
        &state,
        &as_user("alice"),
        cancel(),
        T0 + DAY + 1,
        &Limits::default(),
    );
    assert_eq!(code(idle), "run_expired");
}

#[test]
fn after_a_cancel_the_agent_still_ends_the_run_with_its_terminal_event() {
    let state = given(with(running(), [cancelled_by("alice")]));
    let end = Command::RecordAgentEvent {
        run_id: run("run_a"),
        kind: AgentEventKind::Completed,
        data: "{}".into(),
        tool_call_id: None,
    };
    assert_eq!(
        when(&state, agent(), end),
        Ok(vec![recorded(AgentEventKind::Completed)])
    );
}

// ---- inputs ----

#[test]
fn an_agent_awaits_input_on_a_started_run() {
    let state = given(running());
    assert_eq!(
        when(&state, agent(), await_input("in1", &["approve", "deny"])),
        Ok(vec![requested("in1", &["approve", "deny"])])
    );
}

#[test]
fn awaiting_input_follows_the_lifecycle() {
    let mut before_start = running();
    before_start.pop();
    let state = given(before_start);
    assert_eq!(
        code(when(&state, agent(), await_input("in1", &[]))),
        "invalid_lifecycle"
    );
    let state = given(with(running(), [requested("in1", &[])]));
    assert_eq!(
        code(when(&state, agent(), await_input("in1", &[]))),
        "invalid_lifecycle"
    );
    let state = given(with(running(), [recorded(AgentEventKind::Completed)]));
    assert_eq!(
        code(when(&state, agent(), await_input("in2", &[]))),
        "run_closed"
    );
    assert_eq!(
        code(when(&state, as_user("alice"), await_input("in2", &[]))),
        "forbidden"
    );
}

#[test]
fn inputs_per_run_are_bounded() {
    let limits = Limits::default();
    let many = (0..limits.max_inputs_per_run).map(|i| requested(&format!("in{i}"), &[]));
    let state = given(with(running(), many));
    assert_eq!(
        code(when(&state, agent(), await_input("one_more", &[]))),
        "quota_exceeded"
    );
}

#[test]
fn the_owner_answers_an_input() {
    let state = given(with(running(), [requested("in1", &["approve", "deny"])]));
    assert_eq!(
        when(&state, as_user("alice"), answer("in1", "approve")),
        Ok(vec![answered("in1", "approve")])
    );
}

#[test]
fn an_approval_takes_only_one_of_its_options() {
    let state = given(with(running(), [requested("in1", &["approve", "deny"])]));
    assert_eq!(
        code(when(&state, as_user("alice"), answer("in1", "maybe"))),
        "invalid_request"
    );
}

#[test]
fn answers_are_idempotent_by_input_id() {
    let state = given(with(
        running(),
        [requested("in1", &[]), answered("in1", "blue")],
    ));
    let input = &state.run(&run("run_a")).unwrap().inputs["in1"];
    assert_eq!(input.answer.as_ref().unwrap().position, 6);
    // The same answer again records nothing: the caller gets the original.
    assert_eq!(
        when(&state, as_user("alice"), answer("in1", "blue")),
        Ok(vec![])
    );
    assert_eq!(
        code(when(&state, as_user("alice"), answer("in1", "red"))),
        "input_already_answered"
    );
    // Still the same after the run ended.
    let state = given(with(
        running(),
        [
            requested("in1", &[]),
            answered("in1", "blue"),
            recorded(AgentEventKind::Completed),
        ],
    ));
    assert_eq!(
        when(&state, as_user("alice"), answer("in1", "blue")),
        Ok(vec![])
    );
}

#[test]
fn only_the_owner_answers_and_unknown_inputs_are_not_found() {
    let state = given(with(running(), [requested("in1", &[])]));
    assert_eq!(
        code(when(&state, as_user("bob"), answer("in1", "x"))),
        "run_not_found"
    );
    assert_eq!(code(when(&state, agent(), answer("in1", "x"))), "forbidden");
    assert_eq!(
        code(when(&state, as_user("alice"), answer("nope", "x"))),
        "input_not_found"
    );
}

#[test]
fn an_open_input_of_a_finished_run_cannot_be_answered() {
    let state = given(with(
        running(),
        [requested("in1", &[]), recorded(AgentEventKind::Error)],
    ));
    assert_eq!(
        code(when(&state, as_user("alice"), answer("in1", "x"))),
        "run_closed"
    );
}

#[test]
fn repeats_match_only_the_same_request() {
    assert!(answer("in1", "a").repeats(&answered("in1", "a")));
    assert!(!answer("in1", "a").repeats(&answered("in1", "b")));
    assert!(cancel().repeats(&cancelled_by("alice")));
    assert!(await_input("in1", &[]).repeats(&requested("in1", &[])));
}
