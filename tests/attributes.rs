//! Attributes and the gateway's rules about them, over real WebSockets: attributes come from
//! the token's claims (`--attribute-claims`), never from the client's messages; a `want` on an
//! attribute that is not filterable is refused with `bad_request` naming it; a user without a
//! required attribute (`--require-attribute`) gets `attribute_required`; both before anything
//! changes. A `refresh` brings the new token's attributes. Matching by `want` and `interests`
//! over the wire, in memory and across two instances on a real Redis: two-sided filters,
//! `common_interests` in both `matched` frames, the interests wait.

mod common;

use common::redis::Backend;
use common::{now_secs, sign, Client, TestServer, SECRET};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A token for `sub` with these extra claims, signed with the test secret.
fn token_with(sub: &str, claims: Value) -> String {
    let mut all = json!({"sub": sub, "exp": now_secs() + 3600});
    all.as_object_mut()
        .unwrap()
        .extend(claims.as_object().expect("claims are an object").clone());
    sign(all, SECRET)
}

/// Connects `sub` with a token carrying these extra claims and reads the `welcome`.
async fn connect_with_claims(server: &TestServer, sub: &str, claims: Value) -> Client {
    let mut request = server.ws_url().into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token_with(sub, claims))
            .parse()
            .unwrap(),
    );
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("handshake");
    Client::new(ws, sub).welcomed().await
}

/// Sends `enqueue` with these prefs (and extra top-level fields) and returns the direct reply.
async fn enqueue(client: &mut Client, frame: Value, reference: &str) -> Value {
    let mut frame = frame;
    frame["type"] = json!("enqueue");
    client.request(frame, reference).await
}

/// Asserts that the client is still idle: a refused `enqueue` changed nothing.
async fn still_idle(client: &mut Client) {
    let status = client.request(json!({"type": "status"}), "st").await;
    assert_eq!(status["state"], "idle", "{status}");
}

#[tokio::test]
async fn a_want_on_an_attribute_that_is_not_filterable_is_refused_naming_it() {
    let server = TestServer::start(&[
        "--attribute-claims",
        "country,gender",
        "--filterable-attributes",
        "country",
    ])
    .await;
    let mut c = connect_with_claims(&server, "c", json!({"country": "de", "gender": "f"})).await;
    for want in [
        json!({"gender": ["f"]}),
        json!({"country": ["de"], "gender": ["f"]}),
    ] {
        let e = enqueue(&mut c, json!({"prefs": {"want": want}}), "w1").await;
        assert_eq!(e["type"], "error", "{e}");
        assert_eq!(e["code"], "bad_request", "{e}");
        let message = e["message"].as_str().unwrap();
        assert!(message.contains("prefs.want.gender"), "{message}");
        assert!(message.contains("(filterable: country)"), "{message}");
        still_idle(&mut c).await;
    }
    let queued = enqueue(
        &mut c,
        json!({"prefs": {"want": {"country": ["de", "at"]}}}),
        "w2",
    )
    .await;
    assert_eq!(queued["type"], "queued", "{queued}");

    // Without --filterable-attributes no attribute is: every want is refused.
    let plain = TestServer::start(&["--attribute-claims", "country"]).await;
    let mut d = connect_with_claims(&plain, "d", json!({"country": "de"})).await;
    let e = enqueue(
        &mut d,
        json!({"prefs": {"want": {"country": ["de"]}}}),
        "w3",
    )
    .await;
    assert_eq!(e["code"], "bad_request", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("(filterable: none)"),
        "{e}"
    );
    still_idle(&mut d).await;
}

/// A gateway that queues only users whose token says `age_verified` is true.
async fn age_verified_gateway() -> TestServer {
    TestServer::start(&[
        "--attribute-claims",
        "age_verified,country",
        "--require-attribute",
        "age_verified=true",
    ])
    .await
}

#[tokio::test]
async fn users_without_a_required_attribute_are_not_queued() {
    let server = age_verified_gateway().await;
    for (user, claims) in [
        ("none", json!({})),
        ("false", json!({"age_verified": false})),
        ("other", json!({"country": "de"})),
        ("upper", json!({"age_verified": "TRUE"})),
        ("list", json!({"age_verified": [true]})),
    ] {
        let mut c = connect_with_claims(&server, user, claims).await;
        let e = enqueue(&mut c, json!({}), "q1").await;
        assert_eq!(e["type"], "error", "{user}: {e}");
        assert_eq!(e["code"], "attribute_required", "{user}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains("age_verified=true"),
            "{user}: {e}"
        );
        still_idle(&mut c).await;
    }
    // A boolean claim is the text "true", as is the string "true".
    for (user, claims) in [
        ("bool", json!({"age_verified": true})),
        ("text", json!({"age_verified": "true"})),
    ] {
        let mut c = connect_with_claims(&server, user, claims).await;
        let queued = enqueue(&mut c, json!({}), "q2").await;
        assert_eq!(queued["type"], "queued", "{user}: {queued}");
    }
    let refused = server
        .metric(r#"matchgate_protocol_errors_total{code="attribute_required"}"#)
        .await;
    assert_eq!(refused, 5.0);
}

#[tokio::test]
async fn attributes_come_from_the_token_never_from_messages() {
    let server = age_verified_gateway().await;
    let mut c = connect_with_claims(&server, "c", json!({})).await;
    // Unknown top-level fields are ignored: they set nothing.
    for frame in [
        json!({"attributes": {"age_verified": "true"}}),
        json!({"age_verified": true}),
        json!({"claims": {"age_verified": true}}),
    ] {
        let e = enqueue(&mut c, frame.clone(), "q").await;
        assert_eq!(e["code"], "attribute_required", "{frame}: {e}");
    }
    // Inside prefs they are unknown fields: refused as such.
    let e = enqueue(
        &mut c,
        json!({"prefs": {"attributes": {"age_verified": "true"}}}),
        "p",
    )
    .await;
    assert_eq!(e["code"], "bad_request", "{e}");
    still_idle(&mut c).await;
}

#[tokio::test]
async fn a_refresh_brings_the_new_tokens_attributes_to_later_enqueues() {
    let server = age_verified_gateway().await;
    let mut c = connect_with_claims(&server, "c", json!({})).await;
    let e = enqueue(&mut c, json!({}), "q1").await;
    assert_eq!(e["code"], "attribute_required", "{e}");

    let verified = token_with("c", json!({"age_verified": true}));
    let ack = c
        .request(json!({"type": "refresh", "access_token": verified}), "r1")
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let queued = enqueue(&mut c, json!({}), "q2").await;
    assert_eq!(queued["type"], "queued", "{queued}");

    // A later token without it does not take the queue place away; the next enqueue needs it
    // again.
    let plain = token_with("c", json!({}));
    let ack = c
        .request(json!({"type": "refresh", "access_token": plain}), "r2")
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let status = c.request(json!({"type": "status"}), "s").await;
    assert_eq!(status["state"], "queued", "{status}");
    let dequeued = c.request(json!({"type": "end"}), "e").await;
    assert_eq!(dequeued["type"], "dequeued", "{dequeued}");
    let e = enqueue(&mut c, json!({}), "q3").await;
    assert_eq!(e["code"], "attribute_required", "{e}");
}

/// Runs a matching scenario (an async fn taking the gateways) twice: on one in-memory
/// gateway, and on two instances sharing a real `redis-server`, where the scenario's users
/// alternate between the instances (so attributes and interests travel through Redis).
macro_rules! in_memory_and_on_redis {
    ($name:ident, $flags:expr) => {
        mod $name {
            #[tokio::test]
            async fn memory() {
                super::$name(&[super::TestServer::start($flags).await]).await;
            }

            #[tokio::test]
            async fn redis() {
                let redis = super::Backend::single().await;
                super::$name(&redis.instances(2, $flags).await).await;
            }
        }
    };
}

/// The `n`th user of a scenario connects to this gateway.
fn nth(servers: &[TestServer], n: usize) -> &TestServer {
    &servers[n % servers.len()]
}

/// Users carry a `country` that clients may filter on.
const COUNTRY: &[&str] = &[
    "--attribute-claims",
    "country",
    "--filterable-attributes",
    "country",
];

in_memory_and_on_redis!(
    want_filters_hold_both_ways_on_the_tokens_attributes,
    super::COUNTRY
);
async fn want_filters_hold_both_ways_on_the_tokens_attributes(servers: &[TestServer]) {
    let dach = json!({"want": {"country": ["de", "at"]}});
    // Waiting first: carol from France, no filter of her own; alice from Germany wants DE/AT.
    let mut carol = connect_with_claims(nth(servers, 0), "carol", json!({"country": "fr"})).await;
    let q = enqueue(&mut carol, json!({}), "c").await;
    assert_eq!(q["type"], "queued", "{q}");
    let mut alice = connect_with_claims(nth(servers, 1), "alice", json!({"country": "de"})).await;
    let q = enqueue(&mut alice, json!({"prefs": dach}), "a").await;
    assert_eq!(q["type"], "queued", "alice's want fails carol: {q}");
    // Bob from Austria with the same filter meets alice, not carol who waited longer.
    let mut bob = connect_with_claims(nth(servers, 2), "bob", json!({"country": "at"})).await;
    let q = enqueue(&mut bob, json!({"prefs": dach}), "b").await;
    assert_eq!(q["type"], "queued", "{q}");
    let ma = alice.expect("matched").await;
    let mb = bob.expect("matched").await;
    assert_eq!(ma["session_id"], mb["session_id"]);
    // Dave from Germany without a filter: carol has none either, and his attributes do not
    // matter to her: they meet. Erin from Germany claims in her message to be from France:
    // it changes nothing, her want still needs a German or Austrian peer.
    let mut erin = connect_with_claims(nth(servers, 3), "erin", json!({"country": "de"})).await;
    let q = enqueue(
        &mut erin,
        json!({"prefs": dach, "attributes": {"country": "fr"}, "country": "fr"}),
        "e",
    )
    .await;
    assert_eq!(q["type"], "queued", "{q}");
    let status = carol.request(json!({"type": "status"}), "s").await;
    assert_eq!(
        status["state"], "queued",
        "carol was never matched: {status}"
    );
    let mut dave = connect_with_claims(nth(servers, 4), "dave", json!({"country": "de"})).await;
    let q = enqueue(&mut dave, json!({}), "d").await;
    assert_eq!(q["type"], "queued", "{q}");
    // Carol waited longest and accepts anybody; dave's own want is empty: they meet.
    let mc = carol.expect("matched").await;
    let md = dave.expect("matched").await;
    assert_eq!(mc["session_id"], md["session_id"]);
    // Frank from France has no filter, but erin's holds against him: the waiting user's
    // want counts as much as the newcomer's.
    let mut frank = connect_with_claims(nth(servers, 5), "frank", json!({"country": "fr"})).await;
    let q = enqueue(&mut frank, json!({}), "f").await;
    assert_eq!(q["type"], "queued", "{q}");
    for waiting in [&mut erin, &mut frank] {
        let status = waiting.request(json!({"type": "status"}), "s").await;
        assert_eq!(status["state"], "queued", "{status}");
    }
}

// The interests wait never passes during the test: only sharers meet.
in_memory_and_on_redis!(
    shared_interests_are_in_both_matched_frames,
    &["--interests-wait-ms", "3600000"]
);
async fn shared_interests_are_in_both_matched_frames(servers: &[TestServer]) {
    let mut a = nth(servers, 0).connect("a").await;
    let mut b = nth(servers, 1).connect("b").await;
    let mut c = nth(servers, 2).connect("c").await;
    let q = enqueue(
        &mut a,
        json!({"prefs": {"interests": [" Jazz", "go", "chess", "JAZZ"]}}),
        "a",
    )
    .await;
    assert_eq!(q["type"], "queued", "{q}");
    // c shares nothing with a and neither has waited out the interests wait: no match.
    let q = enqueue(&mut c, json!({"prefs": {"interests": ["rust"]}}), "c").await;
    assert_eq!(q["type"], "queued", "{q}");
    let q = enqueue(
        &mut b,
        json!({"prefs": {"interests": ["chess", "jazz ", "poker"]}}),
        "b",
    )
    .await;
    assert_eq!(q["type"], "queued", "{q}");
    let ma = a.expect("matched").await;
    let mb = b.expect("matched").await;
    assert_eq!(ma["session_id"], mb["session_id"]);
    assert_eq!(ma["common_interests"], json!(["chess", "jazz"]));
    assert_eq!(mb["common_interests"], ma["common_interests"]);
    let status = c.request(json!({"type": "status"}), "s").await;
    assert_eq!(status["state"], "queued", "{status}");
}

in_memory_and_on_redis!(
    after_the_interests_wait_users_who_share_nothing_meet_unless_interests_only,
    &["--interests-wait-ms", "100"]
);
async fn after_the_interests_wait_users_who_share_nothing_meet_unless_interests_only(
    servers: &[TestServer],
) {
    let mut only = nth(servers, 0).connect("only").await;
    let q = enqueue(
        &mut only,
        json!({"prefs": {"interests": ["rust"], "interests_only": true}}),
        "o",
    )
    .await;
    assert_eq!(q["type"], "queued", "{q}");
    let mut a = nth(servers, 1).connect("a").await;
    let q = enqueue(&mut a, json!({"prefs": {"interests": ["jazz"]}}), "a").await;
    assert_eq!(q["type"], "queued", "{q}");
    let mut b = nth(servers, 2).connect("b").await;
    let q = enqueue(&mut b, json!({"prefs": {"interests": ["chess"]}}), "b").await;
    assert_eq!(q["type"], "queued", "{q}");
    // Each search widens once, announced; then a and b meet, sharing nothing.
    // (A plain position update may come first.)
    for client in [&mut a, &mut b] {
        loop {
            let update = client.expect("queue_update").await;
            if update.get("interests_widened").is_some() {
                assert_eq!(update["interests_widened"], true, "{update}");
                assert!(update.get("widened_to").is_none(), "{update}");
                break;
            }
        }
    }
    let ma = a.expect("matched").await;
    let mb = b.expect("matched").await;
    assert_eq!(ma["session_id"], mb["session_id"]);
    assert_eq!(ma["common_interests"], json!([]));
    assert_eq!(mb["common_interests"], json!([]));
    // interests_only never widens: still waiting, and told nothing about widening.
    let status = only.request(json!({"type": "status"}), "s").await;
    assert_eq!(status["state"], "queued", "{status}");
    assert!(
        only.seen
            .iter()
            .all(|f| f.get("interests_widened").is_none()),
        "{:?}",
        only.seen
    );
}
