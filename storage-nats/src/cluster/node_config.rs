//! One node's configuration, from the template `scripts/nats-node.conf`. Std
//! only: the bench (its own workspace) compiles this same file by path.

use std::path::Path;

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
