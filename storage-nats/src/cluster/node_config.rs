//! What the tests' cluster and the bench share about a local nats-server node: its
//! configuration (from the template `scripts/nats-node.conf`) and a GET on its
//! monitoring port. Std only: the bench (its own workspace) compiles this same
//! file by path.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

/// The node configuration: JetStream on, fsync before every acknowledgement
/// (`scripts/nats-node.conf`, the template the script and the bench use too).
pub fn node_config(
    name: &str,
    client: u16,
    cluster: u16,
    http: u16,
    routes: &[u16],
    store: &Path,
) -> String {
    let routes: Vec<String> = routes
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect();
    include_str!("../../../scripts/nats-node.conf")
        .replace("@NAME@", name)
        .replace("@CLIENT@", &client.to_string())
        .replace("@HTTP@", &http.to_string())
        .replace("@STORE@", &store.display().to_string())
        .replace("@CLUSTER@", &cluster.to_string())
        .replace("@ROUTES@", &routes.join(", "))
}

/// The status code and body of `GET path` on 127.0.0.1:`port`, if it answered.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Some((status, body))
}
