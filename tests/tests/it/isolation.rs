//! Issue 4, point 1 (HTTP side): two users with threads and runs, agents
//! appending to both; neither lists, reads, registers on or appends to the
//! other's threads, and the other's thread id answers exactly like a missing one.

use std::collections::BTreeSet;

use serde_json::{json, Value};
use threadline_tests::{token, Api, Reply, TestServer};

/// Two threads per user, each with a started run and a thought.
async fn populate(agent: &Api, owner: &Api) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for title in ["one", "two"] {
        let thread = owner.create_thread(json!({ "title": title })).await;
        let run = agent.register_run(&thread).await;
        for kind in ["agent_started", "agent_thinking"] {
            let r = agent.event(&run, kind, json!({ "of": thread })).await;
            assert_eq!(r.status, 201, "{}", r.body);
        }
        out.push((thread, run));
    }
    out
}

/// The error answer with the id it names blanked out, to compare a hidden and a missing id.
fn shape(r: &Reply, id: &str) -> (u16, Value) {
    let mut body = r.body.clone();
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or("")
        .replace(id, "<id>");
    body["error"]["message"] = json!(message);
    (r.status, body)
}

fn ids(list: &Reply) -> BTreeSet<String> {
    assert_eq!(list.status, 200, "{}", list.body);
    list.body["threads"]
        .as_array()
        .expect("threads")
        .iter()
        .map(|t| t["thread_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn each_user_lists_and_reads_only_its_own_threads() {
    let server = TestServer::spawn();
    let alice = server.api(&token("alice", "user"));
    let bob = server.api(&token("bob@example.com", "user"));
    let agent = server.api(&token("bot", "agent"));
    let auditor = server.api(&token("carol", "auditor"));
    let alices = populate(&agent, &alice).await;
    let bobs = populate(&agent, &bob).await;

    let mine = |v: &[(String, String)]| v.iter().map(|(t, _)| t.clone()).collect::<BTreeSet<_>>();
    assert_eq!(ids(&alice.get("/v1/threads").await), mine(&alices));
    assert_eq!(ids(&bob.get("/v1/threads").await), mine(&bobs));
    // A user cannot ask for someone else's list.
    alice
        .get("/v1/threads?user_id=bob@example.com")
        .await
        .assert_error(403, "forbidden");
    // The auditor sees both, and each user's on request.
    let all: BTreeSet<_> = mine(&alices).union(&mine(&bobs)).cloned().collect();
    assert_eq!(ids(&auditor.get("/v1/threads").await), all);
    assert_eq!(
        ids(&auditor.get("/v1/threads?user_id=alice").await),
        mine(&alices)
    );

    // Each user's own events: only its threads, its own dense user_seq 1..n.
    for (user, threads) in [(&alice, &alices), (&bob, &bobs)] {
        let mut seqs = Vec::new();
        for (thread, _) in threads.iter() {
            let frames = user.thread_events(thread).await;
            assert_eq!(frames.len(), 4, "{frames:?}");
            for f in &frames {
                assert_eq!(f["thread_id"], json!(thread));
                seqs.push(f["user_seq"].as_u64().unwrap());
            }
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=8).collect::<Vec<u64>>(), "user_seq is per user");
    }
}

#[tokio::test]
async fn another_users_thread_answers_exactly_like_a_missing_one() {
    let server = TestServer::spawn();
    let alice = server.api(&token("alice", "user"));
    let bob = server.api(&token("bob", "user"));
    let agent = server.api(&token("bot", "agent"));
    let (bobs_thread, bobs_run) = populate(&agent, &bob).await.remove(0);
    let before = bob.thread_events(&bobs_thread).await;
    let missing = uuid::Uuid::new_v4().to_string();

    for (what, hidden, absent) in [
        (
            "get",
            alice.get(&format!("/v1/threads/{bobs_thread}")).await,
            alice.get(&format!("/v1/threads/{missing}")).await,
        ),
        (
            "events",
            alice
                .get(&format!("/v1/threads/{bobs_thread}/events"))
                .await,
            alice.get(&format!("/v1/threads/{missing}/events")).await,
        ),
        (
            "register run",
            alice
                .post(
                    &format!("/v1/threads/{bobs_thread}/runs"),
                    &json!({"agent_name": "mine"}),
                )
                .await,
            alice
                .post(
                    &format!("/v1/threads/{missing}/runs"),
                    &json!({"agent_name": "mine"}),
                )
                .await,
        ),
        (
            "register run with If-Match",
            alice
                .post_if_match(
                    &format!("/v1/threads/{bobs_thread}/runs"),
                    &json!({"agent_name": "mine"}),
                    3,
                )
                .await,
            alice
                .post_if_match(
                    &format!("/v1/threads/{missing}/runs"),
                    &json!({"agent_name": "mine"}),
                    3,
                )
                .await,
        ),
    ] {
        hidden.assert_error(404, "thread_not_found");
        assert_eq!(
            shape(&hidden, &bobs_thread),
            shape(&absent, &missing),
            "{what}: a hidden thread must look missing"
        );
    }

    // Users never append agent events, to anyone's run: the role check comes first.
    alice
        .event(&bobs_run, "agent_thinking", json!({}))
        .await
        .assert_error(403, "forbidden");
    // Nor create threads in another's name.
    alice
        .post("/v1/threads", &json!({"user_id": "bob"}))
        .await
        .assert_error(403, "forbidden");

    // Nothing Alice tried reached Bob's thread, and Bob still reads it.
    assert_eq!(bob.thread_events(&bobs_thread).await, before);
    let detail = bob.get(&format!("/v1/threads/{bobs_thread}")).await;
    assert_eq!(detail.status, 200, "{}", detail.body);
    assert_eq!(detail.body["runs"].as_array().unwrap().len(), 1);
    // Alice's list stays empty.
    assert!(ids(&alice.get("/v1/threads").await).is_empty());
}
