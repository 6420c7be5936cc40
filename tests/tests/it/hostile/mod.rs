//! Issue 11: hostile clients at the edge. One file per finding, each test with
//! the attack and the answer the contract (`docs/PROTOCOL.md`) gives it.
//! Limits are set through their `THREADLINE_*` variables, small enough that
//! each attack takes a second, not a production-sized minute.

mod f01_idempotency;
mod f02_messages;
mod f03_connections;
mod f04_stalled_sockets;
mod f05_user_state;
mod f06_data_dir;
mod f07_integers;
mod f08_secrets;
mod f09_filtered_acks;
mod f10_queries;

use threadline_tests::{token, Reply, Socket, TestServer};

/// The answer is the contract's error with nothing but a code and a message
/// naming none of `secrets` (another caller's ids and results).
#[track_caller]
pub(super) fn reveals_nothing(r: &Reply, status: u16, code: &str, secrets: &[&str]) {
    r.assert_error(status, code);
    let body = r.body.to_string();
    assert_eq!(
        r.body.as_object().map(|o| o.len()),
        Some(1),
        "only an error: {body}"
    );
    for s in secrets {
        assert!(!body.contains(s), "the answer reveals {s}: {body}");
    }
}

/// Opens a socket for `user` past its history, reading welcome and caught_up.
pub(super) async fn live_socket(server: &TestServer, user: &str) -> Socket {
    let mut s = server
        .socket(&token(user, "user"), "after=latest")
        .await
        .expect("upgrade");
    s.welcome().await.expect("welcome");
    s.until("caught_up").await.expect("caught_up");
    s
}
