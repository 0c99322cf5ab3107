//! Safety and fairness rules, each in the embedded mode and across two instances sharing a
//! real Redis (clients alternate between the instances, as behind a load balancer without
//! sticky sessions): blocks, anti-repeat, skip cooldowns, the per-user enqueue rate, the
//! accept phase and preference relaxation.

mod common;

use common::redis::RedisServer;
use common::{Client, TestServer};
use serde_json::{json, Value};

/// Gateways of one scenario: one in-memory instance, or two instances on one Redis.
struct Deployment {
    servers: Vec<TestServer>,
    _redis: Option<RedisServer>,
}

impl Deployment {
    async fn memory(flags: &[&str]) -> Deployment {
        Deployment {
            servers: vec![TestServer::start(flags).await],
            _redis: None,
        }
    }

    async fn redis(flags: &[&str]) -> Deployment {
        let redis = RedisServer::start().await;
        let servers = Self::instances(&redis, flags).await;
        Deployment {
            servers,
            _redis: Some(redis),
        }
    }

    async fn instances(redis: &RedisServer, flags: &[&str]) -> Vec<TestServer> {
        let url = redis.url();
        let mut servers = Vec::new();
        for id in ["a", "b"] {
            let mut args = vec!["--redis-url", &url, "--instance-id", id];
            args.extend(["--instance-heartbeat-ms", "100"]);
            args.extend_from_slice(flags);
            servers.push(TestServer::start(&args).await);
        }
        servers
    }

    /// Connects the `n`-th client of the scenario (alternating instances).
    async fn connect(&self, n: usize, user: &str) -> Client {
        self.servers[n % self.servers.len()].connect(user).await
    }
}

/// Runs a scenario in both modes.
macro_rules! in_both_modes {
    ($scenario:ident, $flags:expr) => {
        mod $scenario {
            use super::*;

            #[tokio::test]
            async fn memory() {
                super::$scenario(Deployment::memory(&$flags).await).await;
            }

            #[tokio::test]
            async fn redis_two_instances() {
                super::$scenario(Deployment::redis(&$flags).await).await;
            }
        }
    };
}

/// Sends `frame` and reads the next `n` frames, whatever their order (events and the direct
/// reply travel separately).
async fn send_and_read(c: &mut Client, frame: Value, n: usize) -> Vec<Value> {
    c.send(frame).await;
    let mut frames = Vec::new();
    for _ in 0..n {
        frames.push(c.next().await.expect("open"));
    }
    frames
}

fn of_type<'a>(frames: &'a [Value], kind: &str) -> &'a Value {
    frames
        .iter()
        .find(|f| f["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} among {frames:?}"))
}

async fn enqueue(c: &mut Client) {
    c.send(json!({"type": "enqueue"})).await;
    c.expect("queued").await;
}

/// The next frame that is not a `queue_update`.
async fn next_event(c: &mut Client) -> Value {
    loop {
        let v = c.next().await.expect("open");
        if v["type"] != "queue_update" {
            return v;
        }
    }
}

/// `ender` ends the session with `other`; both hear of it.
async fn end_session(ender: &mut Client, other: &mut Client) {
    ender.send(json!({"type": "end"})).await;
    ender.expect("session_ended").await;
    other.expect("session_ended").await;
}

async fn state(c: &mut Client) -> Value {
    c.request(json!({"type": "status"}), "st").await["state"].clone()
}

in_both_modes!(blocked_pairs_never_meet_again, []);
async fn blocked_pairs_never_meet_again(d: Deployment) {
    let mut a = d.connect(0, "alice").await;
    let mut b = d.connect(1, "bob").await;
    let mut c = d.connect(2, "carol").await;
    // Nobody to block yet.
    let r = a.request(json!({"type": "block"}), "b0").await;
    assert_eq!(r["code"], "invalid_state");
    let (ma, _) = common::match_up(&mut a, &mut b).await;
    let frames = send_and_read(&mut a, json!({"type": "block", "ref": "b1"}), 2).await;
    assert_eq!(of_type(&frames, "ack")["ref"], "b1");
    assert_eq!(of_type(&frames, "ack")["action"], "block");
    assert_eq!(of_type(&frames, "session_ended")["reason"], "end");
    // The blocked one hears only that the session ended.
    let eb = b.expect("session_ended").await;
    assert_eq!(eb["reason"], "peer_ended");
    // Both wait; they are never paired, whoever else comes.
    enqueue(&mut b).await;
    enqueue(&mut a).await;
    enqueue(&mut c).await;
    let mb = next_event(&mut b).await;
    let mc = next_event(&mut c).await;
    assert_eq!(mb["type"], "matched");
    assert_eq!(mb["session_id"], mc["session_id"]);
    assert_eq!(state(&mut a).await, "queued");
    // Blocking an older session by id also works (and is idempotent).
    let r = a
        .request(
            json!({"type": "block", "session_id": ma["session_id"]}),
            "b2",
        )
        .await;
    assert_eq!(r["type"], "ack");
    let r = a
        .request(json!({"type": "block", "session_id": "s_nope"}), "b3")
        .await;
    assert_eq!(r["code"], "invalid_state");
}

#[tokio::test]
async fn blocks_survive_gateway_restarts_in_redis_mode() {
    let redis = RedisServer::start().await;
    let servers = Deployment::instances(&redis, &[]).await;
    let mut a = servers[0].connect("alice").await;
    let mut b = servers[1].connect("bob").await;
    common::match_up(&mut a, &mut b).await;
    send_and_read(&mut b, json!({"type": "block", "ref": "x"}), 2).await;
    a.expect("session_ended").await;
    drop((a, b));
    for s in servers {
        s.shutdown().await;
    }
    let servers = Deployment::instances(&redis, &[]).await;
    let mut a = servers[1].connect("alice").await;
    let mut b = servers[0].connect("bob").await;
    let mut c = servers[0].connect("carol").await;
    enqueue(&mut a).await;
    enqueue(&mut b).await;
    enqueue(&mut c).await;
    assert_eq!(next_event(&mut a).await["type"], "matched");
    assert_eq!(next_event(&mut c).await["type"], "matched");
    assert_eq!(state(&mut b).await, "queued");
}

in_both_modes!(
    recent_pairs_wait_for_somebody_new_then_fall_back,
    [
        "--anti-repeat-window-s",
        "600",
        "--anti-repeat-fallback-ms",
        "1500"
    ]
);
async fn recent_pairs_wait_for_somebody_new_then_fall_back(d: Deployment) {
    let mut a = d.connect(0, "alice").await;
    let mut b = d.connect(1, "bob").await;
    let mut c = d.connect(2, "carol").await;
    common::match_up(&mut a, &mut b).await;
    end_session(&mut a, &mut b).await;
    // alice and bob wait first, but carol is the one alice meets.
    enqueue(&mut a).await;
    enqueue(&mut b).await;
    enqueue(&mut c).await;
    let ma = next_event(&mut a).await;
    let mc = next_event(&mut c).await;
    assert_eq!(ma["type"], "matched");
    assert_eq!(ma["session_id"], mc["session_id"]);
    end_session(&mut a, &mut c).await;
    // Nobody new comes: after the fallback, bob and alice meet again after all.
    enqueue(&mut a).await;
    let mb = next_event(&mut b).await;
    let ma = next_event(&mut a).await;
    assert_eq!(mb["type"], "matched");
    assert_eq!(ma["session_id"], mb["session_id"]);
}

in_both_modes!(
    recent_partners_are_remembered_across_reconnects,
    [
        "--anti-repeat-window-s",
        "600",
        "--anti-repeat-fallback-ms",
        "600000",
        "--resume-grace-ms",
        "100"
    ]
);
async fn recent_partners_are_remembered_across_reconnects(d: Deployment) {
    let mut a = d.connect(0, "alice").await;
    let mut b = d.connect(1, "bob").await;
    common::match_up(&mut a, &mut b).await;
    end_session(&mut a, &mut b).await;
    // alice leaves until everything the gateway held for her connection is gone (a new
    // connection then starts a new event log).
    // Each look is a new connection that holds her state for another grace period, so look
    // only every few grace periods.
    a.close().await;
    let mut a = loop {
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        let c = d.connect(1, "alice").await;
        if c.welcome["last_seq"] == 0 {
            break c;
        }
        c.close().await;
    };
    let mut c = d.connect(2, "carol").await;
    enqueue(&mut a).await;
    enqueue(&mut b).await;
    enqueue(&mut c).await;
    let ma = next_event(&mut a).await;
    assert_eq!(ma["session_id"], next_event(&mut c).await["session_id"]);
    assert_eq!(state(&mut b).await, "queued");
    // Her most recent peer is still known for block and report.
    let r = a
        .request(json!({"type": "report", "reason": "spam"}), "r")
        .await;
    assert_eq!(r["type"], "ack");
}

in_both_modes!(
    quick_skippers_cool_down_and_a_real_conversation_forgives,
    [
        "--skip-limit",
        "2",
        "--skip-quick-s",
        "1",
        "--skip-window-s",
        "600",
        "--skip-cooldowns-s",
        "2,3",
        "--requeue-peer-on-skip",
        "false"
    ]
);
async fn quick_skippers_cool_down_and_a_real_conversation_forgives(d: Deployment) {
    let mut a = d.connect(0, "alice").await;
    let mut others = Vec::new();
    for (i, name) in ["bob", "carol", "dave", "erin"].iter().enumerate() {
        others.push(d.connect(i + 1, name).await);
    }
    // One quick skip...
    common::match_up(&mut a, &mut others[0]).await;
    a.send(json!({"type": "skip"})).await;
    assert_eq!(a.expect("session_ended").await["requeued"], true);
    a.expect("queued").await;
    others[0].expect("session_ended").await;
    // ...then a conversation longer than the quick threshold forgives it...
    enqueue(&mut others[1]).await;
    a.expect("matched").await;
    others[1].expect("matched").await;
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    a.send(json!({"type": "skip"})).await;
    assert_eq!(a.expect("session_ended").await["requeued"], true);
    a.expect("queued").await;
    // ...so it takes two more quick skips to start a cooldown.
    enqueue(&mut others[2]).await;
    a.expect("matched").await;
    a.send(json!({"type": "skip"})).await;
    assert_eq!(a.expect("session_ended").await["requeued"], true);
    a.expect("queued").await;
    enqueue(&mut others[3]).await;
    a.expect("matched").await;
    a.send(json!({"type": "skip", "ref": "s4"})).await;
    let ended = a.expect("session_ended").await;
    assert_eq!(
        (ended["ref"].as_str(), ended["requeued"].as_bool()),
        (Some("s4"), Some(false))
    );
    let cooldown = a.expect("error").await;
    assert_eq!(cooldown["code"], "cooldown");
    assert!(cooldown["retry_after_ms"].as_u64().unwrap() > 0);
    assert_eq!(state(&mut a).await, "idle");
    // During the cooldown, on any instance, enqueue is refused.
    drop(a);
    let mut a = d.connect(1, "alice").await;
    let refused = a.request(json!({"type": "enqueue"}), "e1").await;
    assert_eq!(refused["code"], "cooldown");
    let wait = refused["retry_after_ms"].as_u64().unwrap();
    assert!(wait > 0 && wait <= 2_000, "{refused}");
    // Afterwards it is accepted again.
    tokio::time::sleep(std::time::Duration::from_millis(wait + 50)).await;
    let queued = a.request(json!({"type": "enqueue"}), "e2").await;
    assert_eq!(queued["type"], "queued");
}

in_both_modes!(
    enqueues_per_user_are_rate_limited,
    ["--enqueue-per-minute", "3"]
);
async fn enqueues_per_user_are_rate_limited(d: Deployment) {
    let mut a = d.connect(0, "alice").await;
    for i in 0..3 {
        enqueue(&mut a).await;
        // A new connection elsewhere does not reset the count.
        if i == 1 {
            drop(a);
            a = d.connect(1, "alice").await;
        }
        let r = a.request(json!({"type": "end"}), &format!("e{i}")).await;
        assert_eq!(r["type"], "dequeued");
    }
    let limited = a.request(json!({"type": "enqueue"}), "e3").await;
    assert_eq!(limited["code"], "rate_limited");
    assert!(limited["retry_after_ms"].as_u64().unwrap() > 0);
    assert_eq!(state(&mut a).await, "idle");
}

/// Matches `a` and `b` through the accept phase up to both proposals.
async fn proposed(a: &mut Client, b: &mut Client) -> (Value, Value) {
    enqueue(a).await;
    enqueue(b).await;
    let pa = next_event(a).await;
    let pb = next_event(b).await;
    assert_eq!(pa["type"], "match_proposed", "{pa}");
    assert_eq!(pa["match_id"], pb["match_id"]);
    (pa, pb)
}

in_both_modes!(accept_phase, ["--accept-timeout-ms", "1500"]);
async fn accept_phase(d: Deployment) {
    let mut a = d.connect(0, "alice").await;
    let mut b = d.connect(1, "bob").await;
    // Both accept: matched.
    let (pa, pb) = proposed(&mut a, &mut b).await;
    assert_eq!(state(&mut a).await, "queued");
    let m = pa["match_id"].clone();
    let r = a
        .request(json!({"type": "accept", "match_id": m}), "a1")
        .await;
    assert_eq!(r["type"], "ack");
    let frames = send_and_read(&mut b, json!({"type": "accept", "match_id": m}), 2).await;
    assert_eq!(of_type(&frames, "matched")["session_id"], m);
    assert_eq!(of_type(&frames, "matched")["peer"], pb["peer"]);
    assert_eq!(a.expect("matched").await["session_id"], m);
    // A stale or foreign match id is refused.
    let r = a
        .request(json!({"type": "accept", "match_id": "s_other"}), "a2")
        .await;
    assert_eq!(r["code"], "invalid_state");
    end_session(&mut a, &mut b).await;

    // bob declines: he goes idle, alice back to the head of the queue.
    let (pa, _) = proposed(&mut a, &mut b).await;
    let m = pa["match_id"].clone();
    let frames = send_and_read(&mut b, json!({"type": "decline", "match_id": m}), 2).await;
    let cancelled = of_type(&frames, "match_cancelled");
    assert_eq!(
        (
            cancelled["reason"].as_str(),
            cancelled["requeued"].as_bool()
        ),
        (Some("declined"), Some(false))
    );
    let ca = next_event(&mut a).await;
    assert_eq!(
        (ca["reason"].as_str(), ca["requeued"].as_bool()),
        (Some("peer_declined"), Some(true))
    );
    assert_eq!(state(&mut a).await, "queued");
    assert_eq!(state(&mut b).await, "idle");

    // A declined pair is not proposed again right away: carol comes. alice accepts, carol
    // lets it time out.
    enqueue(&mut b).await;
    let mut c = d.connect(2, "carol").await;
    enqueue(&mut c).await;
    let pa = next_event(&mut a).await;
    assert_eq!(pa["type"], "match_proposed");
    assert_eq!(next_event(&mut c).await["type"], "match_proposed");
    a.request(json!({"type": "accept", "match_id": pa["match_id"]}), "a3")
        .await;
    let cc = next_event(&mut c).await;
    assert_eq!(
        (cc["reason"].as_str(), cc["requeued"].as_bool()),
        (Some("timeout"), Some(false))
    );
    let ca = next_event(&mut a).await;
    assert_eq!(
        (ca["reason"].as_str(), ca["requeued"].as_bool()),
        (Some("peer_timeout"), Some(true))
    );
    assert_eq!(state(&mut a).await, "queued");
}

in_both_modes!(
    decliners_go_to_the_tail_when_configured,
    ["--accept-timeout-ms", "5000", "--decline-to", "tail"]
);
async fn decliners_go_to_the_tail_when_configured(d: Deployment) {
    let mut a = d.connect(0, "alice").await;
    let mut b = d.connect(1, "bob").await;
    let (pa, _) = proposed(&mut a, &mut b).await;
    b.send(json!({"type": "decline", "match_id": pa["match_id"]}))
        .await;
    let mut seen = Vec::new();
    while !seen.iter().any(|f: &Value| f["type"] == "queued") {
        seen.push(next_event(&mut b).await);
    }
    let cancelled = of_type(&seen, "match_cancelled");
    assert_eq!(cancelled["requeued"], true);
    // Both wait again, but a declined pair is not proposed again right away.
    assert_eq!(next_event(&mut a).await["type"], "match_cancelled");
    assert_eq!(state(&mut a).await, "queued");
    assert_eq!(state(&mut b).await, "queued");
}

in_both_modes!(
    a_lapsed_proposal_is_not_proposed_again_at_once,
    ["--accept-timeout-ms", "300", "--decline-to", "tail"]
);
async fn a_lapsed_proposal_is_not_proposed_again_at_once(d: Deployment) {
    let mut a = d.connect(0, "alice").await;
    let mut b = d.connect(1, "bob").await;
    let (pa, _) = proposed(&mut a, &mut b).await;
    a.request(json!({"type": "accept", "match_id": pa["match_id"]}), "a")
        .await;
    // bob does not answer: he goes to the tail, alice back to her place...
    let cb = next_event(&mut b).await;
    assert_eq!(
        (cb["reason"].as_str(), cb["requeued"].as_bool()),
        (Some("timeout"), Some(true))
    );
    b.expect("queued").await;
    let ca = next_event(&mut a).await;
    assert_eq!(ca["reason"], "peer_timeout");
    // ...and they are not proposed to each other again in the same breath: the next frame
    // bob gets is the answer to his own question.
    let status = b.request(json!({"type": "status"}), "st").await;
    assert_eq!(status["state"], "queued");
}

in_both_modes!(
    soft_preferences_widen_until_somebody_fits,
    ["--relax-after-ms", "300"]
);
async fn soft_preferences_widen_until_somebody_fits(d: Deployment) {
    let mut a = d.connect(0, "alice").await;
    let mut c = d.connect(1, "carol").await;
    let mut s = d.connect(2, "sam").await;
    let prefs = json!({"topic": "music", "language": "en", "soft": ["language", "topic"]});
    a.send(json!({"type": "enqueue", "prefs": prefs})).await;
    a.expect("queued").await;
    // carol wants music in any language.
    c.send(json!({"type": "enqueue", "prefs": {"topic": "music"}}))
        .await;
    c.expect("queued").await;
    // Until alice's search widens, nobody fits her exact preferences.
    let widened = next_event_of(&mut a, "queue_update").await;
    assert_eq!(widened["widened_to"], json!({"topic": "music"}));
    let ma = next_event(&mut a).await;
    let mc = next_event(&mut c).await;
    assert_eq!(ma["type"], "matched");
    assert_eq!(ma["session_id"], mc["session_id"]);
    a.send(json!({"type": "end"})).await;
    a.expect("session_ended").await;
    // Next time, after two steps, sam (who wants nothing in particular) fits.
    enqueue(&mut s).await;
    a.send(json!({"type": "enqueue", "prefs": prefs})).await;
    a.expect("queued").await;
    let first = next_event_of(&mut a, "queue_update").await;
    assert_eq!(first["widened_to"], json!({"topic": "music"}));
    let second = next_event_of(&mut a, "queue_update").await;
    assert_eq!(second["widened_to"], json!({}));
    let ma = next_event(&mut a).await;
    assert_eq!(ma["type"], "matched");
    assert_eq!(next_event(&mut s).await["session_id"], ma["session_id"]);
}

/// The next frame of type `kind`, skipping queue updates that do not widen the search.
async fn next_event_of(c: &mut Client, kind: &str) -> Value {
    loop {
        let v = c.next().await.expect("open");
        if v["type"] == kind && (kind != "queue_update" || v.get("widened_to").is_some()) {
            return v;
        }
        assert_eq!(
            v["type"], "queue_update",
            "unexpected {v} while waiting for {kind}"
        );
    }
}

#[tokio::test]
async fn soft_fields_must_be_set_and_unique() {
    let server = TestServer::start(&[]).await;
    let mut a = server.connect("alice").await;
    for prefs in [
        json!({"topic": "music", "soft": ["language"]}),
        json!({"topic": "music", "soft": ["topic", "topic"]}),
        json!({"topic": "music", "soft": ["colour"]}),
    ] {
        let r = a
            .request(json!({"type": "enqueue", "prefs": prefs}), "p")
            .await;
        assert_eq!(r["code"], "bad_request", "{prefs}");
    }
}

/// `c` asks for its state and reads up to the reply, whatever events come first.
async fn state_after_events(c: &mut Client) -> Value {
    c.send(json!({"type": "status", "ref": "st"})).await;
    loop {
        let v = c.next().await.expect("open");
        if v["ref"] == "st" && v["type"] == "status" {
            return v["state"].clone();
        }
    }
}

in_both_modes!(
    ending_quickly_and_enqueueing_again_counts_as_a_quick_skip,
    [
        "--skip-limit",
        "5",
        "--skip-quick-s",
        "30",
        "--skip-window-s",
        "600",
        "--skip-cooldowns-s",
        "60"
    ]
);
async fn ending_quickly_and_enqueueing_again_counts_as_a_quick_skip(d: Deployment) {
    let mut a = d.connect(0, "alice").await;
    let mut b = d.connect(1, "bob").await;
    // alice cycles partners with `end` and `enqueue` instead of `skip` (bob is the partner
    // each time: anti-repeat is off).
    for cycle in 0..10 {
        let r = a
            .request(json!({"type": "enqueue"}), &format!("q{cycle}"))
            .await;
        if r["type"] == "error" {
            assert_eq!(r["code"], "cooldown", "{r}");
            assert_eq!(r["retry_after_ms"], 60_000, "{r}");
            // The fifth quick end followed by an enqueue, as for skips.
            assert_eq!(cycle, 5, "quick ends counted: {cycle}");
            assert_eq!(state(&mut a).await, "idle");
            // The cooldown holds on every instance.
            drop(a);
            let mut a = d.connect(1, "alice").await;
            let again = a.request(json!({"type": "enqueue"}), "again").await;
            assert_eq!(again["code"], "cooldown", "{again}");
            return;
        }
        assert_eq!(r["type"], "queued", "{r}");
        enqueue(&mut b).await;
        a.expect("matched").await;
        b.expect("matched").await;
        end_session(&mut a, &mut b).await;
    }
    panic!("ten quick end + enqueue cycles never reached a cooldown");
}

in_both_modes!(
    a_block_list_keeps_only_the_most_recent_blocks,
    ["--max-blocks-per-user", "2"]
);
async fn a_block_list_keeps_only_the_most_recent_blocks(d: Deployment) {
    let mut a = d.connect(0, "alice").await;
    let mut bob = d.connect(1, "bob").await;
    let mut carol = d.connect(2, "carol").await;
    let mut dave = d.connect(3, "dave").await;
    // alice blocks bob, then carol, and just ends her session with dave.
    for c in [&mut bob, &mut carol] {
        common::match_up(&mut a, c).await;
        send_and_read(&mut a, json!({"type": "block", "ref": "b"}), 2).await;
        c.expect("session_ended").await;
    }
    common::match_up(&mut a, &mut dave).await;
    end_session(&mut a, &mut dave).await;
    // alice and bob wait together, apart: blocked.
    let topic = |t: &str| json!({"type": "enqueue", "prefs": {"topic": t}});
    bob.send(topic("bob")).await;
    bob.expect("queued").await;
    a.send(topic("bob")).await;
    a.expect("queued").await;
    assert_eq!(state_after_events(&mut bob).await, "queued");
    // A third block with room for two drops bob's, the oldest: alice meets bob at once.
    let frames = send_and_read(&mut a, json!({"type": "block", "ref": "b3"}), 2).await;
    assert_eq!(of_type(&frames, "ack")["ref"], "b3");
    let ma = of_type(&frames, "matched");
    assert_eq!(next_event(&mut bob).await["session_id"], ma["session_id"]);
    end_session(&mut a, &mut bob).await;
    // carol's block still holds: erin, who came later, gets alice.
    a.send(topic("carol")).await;
    a.expect("queued").await;
    carol.send(topic("carol")).await;
    carol.expect("queued").await;
    let mut e = d.connect(4, "erin").await;
    e.send(topic("carol")).await;
    e.expect("queued").await;
    let me = next_event(&mut e).await;
    assert_eq!(me["type"], "matched", "{me}");
    assert_eq!(next_event(&mut a).await["session_id"], me["session_id"]);
    assert_eq!(state_after_events(&mut carol).await, "queued");
}

in_both_modes!(
    blocks_are_forgotten_when_their_owner_stays_away,
    ["--block-ttl-s", "1", "--resume-grace-ms", "100"]
);
async fn blocks_are_forgotten_when_their_owner_stays_away(d: Deployment) {
    let mut a = d.connect(0, "alice").await;
    let mut b = d.connect(1, "bob").await;
    common::match_up(&mut a, &mut b).await;
    send_and_read(&mut a, json!({"type": "block", "ref": "b"}), 2).await;
    b.expect("session_ended").await;
    a.close().await;
    // alice stays away for longer than the block TTL (each look at her is a visit that keeps
    // her blocks another TTL, so look only every TTL and a half): then she and bob meet.
    let forgotten = async {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
            let mut a = d.connect(2, "alice").await;
            enqueue(&mut a).await;
            enqueue(&mut b).await;
            if state_after_events(&mut b).await == "in_session" {
                return;
            }
            for c in [&mut a, &mut b] {
                let r = c.request(json!({"type": "end"}), "e").await;
                assert_eq!(r["type"], "dequeued", "{r}");
            }
            a.close().await;
        }
    };
    tokio::time::timeout(common::PATIENCE, forgotten)
        .await
        .expect("alice's block of bob expires");
}
