//! Finding 8: short HS256 secrets are refused; a secret can come from a file.

use std::time::{Duration, Instant};

use threadline_tests::{token, Options, TestServer, SECRET};

/// Runs `threadline <args>` with `env`, waiting (bounded) for it to exit.
fn exits(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = std::process::Command::new(threadline_tests::binary());
    cmd.args(args)
        .env_remove("THREADLINE_JWT_SECRET")
        .env_remove("THREADLINE_JWT_SECRET_FILE")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (None, "still running".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// Finding 8: weak secrets are refused; a secret can come from a file.
#[tokio::test]
async fn f8_short_secrets_are_refused_and_a_secret_file_keeps_it_off_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let short = &SECRET[..31];
    for (args, env) in [
        (
            vec![
                "serve",
                "--data",
                data,
                "--listen",
                "127.0.0.1:0",
                "--jwt-secret",
                short,
            ],
            vec![],
        ),
        (
            vec!["serve", "--data", data, "--listen", "127.0.0.1:0"],
            vec![("THREADLINE_JWT_SECRET", short)],
        ),
        (
            vec!["token", "--sub", "alice", "--jwt-secret", short],
            vec![],
        ),
    ] {
        let (code, err) = exits(&args, &env);
        assert!(
            code.is_some_and(|c| c != 0),
            "{args:?} {env:?}: {code:?} {err}"
        );
        assert!(err.contains("32 bytes"), "{err}");
    }
    let short_file = dir.path().join("short.secret");
    std::fs::write(&short_file, format!("{short}\n")).unwrap();
    let (code, err) = exits(
        &[
            "serve",
            "--data",
            data,
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret-file",
            short_file.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        code.is_some_and(|c| c != 0) && err.contains("32 bytes"),
        "{code:?} {err}"
    );

    // From a file, by flag and by variable: tokens signed with it work and it
    // is nowhere on the command line.
    let file = dir.path().join("jwt.secret");
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let path = file.to_str().unwrap().to_owned();
    for options in [
        Options {
            keys: Some(vec!["--jwt-secret-file".into(), path.clone()]),
            ..Options::default()
        },
        Options {
            keys: Some(vec![]),
            ..Options::env(&[("THREADLINE_JWT_SECRET_FILE", &path)])
        },
    ] {
        let server = TestServer::spawn_with(options);
        let r = server.api(&token("alice", "user")).get("/v1/threads").await;
        assert_eq!(r.status, 200, "{}", r.body);
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", server.pid())).unwrap();
        assert!(!String::from_utf8_lossy(&cmdline).contains(SECRET));
    }
}
