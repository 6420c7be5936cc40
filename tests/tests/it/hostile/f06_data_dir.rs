//! Finding 6: the data dir is private.

use serde_json::json;
use threadline_tests::{token, Options, TestServer};

// Finding 6: the data dir and everything in it are private.
#[tokio::test]
async fn f6_the_data_dir_is_created_0700_and_its_files_are_not_readable_by_others() {
    use std::os::unix::fs::PermissionsExt;
    let mut server = TestServer::spawn_with(Options {
        sh: Some("umask 022".into()),
        data_subdir: Some("fresh/data".into()),
        ..Options::default()
    });
    let alice = server.api(&token("alice", "user"));
    alice.create_thread(json!({"title": "t"})).await;
    assert!(server.stop().success());
    let dir = server.data_dir().to_owned();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    let mut stack = vec![dir];
    let mut seen = 0;
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            assert_eq!(mode(&p) & 0o077, 0, "{} is {:o}", p.display(), mode(&p));
            seen += 1;
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    assert!(seen >= 3, "the log wrote files");
}
