//! Issue 11: hostile clients at the edge. One file per finding, each test with
//! the attack and the answer the contract (`docs/PROTOCOL.md`) gives it.
//! Limits are set through their `THREADLINE_*` variables, small enough that
//! each attack takes a second, not a production-sized minute.

mod f06_data_dir;
mod f07_integers;
mod f08_secrets;
mod f10_queries;

use threadline_tests::{token, Socket, TestServer};

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
