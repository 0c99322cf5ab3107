//! The hot paths of one match, each on its own: decoding a client frame, encoding `matched`
//! (the one serialisation each event gets), and one match step in each engine (the `enqueue`
//! that finds a waiting partner and makes the session live), the Redis one against a
//! throw-away `redis-server` this bench starts on a free loopback port.
//!
//! Run: `cargo bench --bench hot_paths` (needs `redis-server` on the `PATH`).

mod support;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use matchgate::matching::{ConnId, Engine, UserId};
use matchgate::p2p::{IceServers, Turn};
use matchgate::protocol::{encode_event, parse_request, Event, Prefs, Role};
use support::{memory, redis, RedisProcess};

/// What a client sends most: `enqueue` with preferences and a `ref`.
const ENQUEUE: &str = r#"{"type":"enqueue","ref":"q-17","prefs":{"topic":"music","format":"video","language":"de","region":"eu"}}"#;

/// A `signal` the size of a typical SDP offer (about 2 KiB).
fn signal_frame() -> String {
    let sdp =
        "a=candidate:1 1 udp 2122260223 192.0.2.1 54400 typ host generation 0\\r\\n".repeat(28);
    format!(r#"{{"type":"signal","ref":"s-3","payload":{{"type":"offer","sdp":"{sdp}"}}}}"#)
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    let signal = signal_frame();
    for (name, frame) in [("enqueue", ENQUEUE), ("signal_2k", signal.as_str())] {
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| parse_request(black_box(frame), 64 * 1024).expect("a valid frame"))
        });
    }
    group.finish();
}

fn encode_matched(c: &mut Criterion) {
    // What p2p mode sends: a STUN entry and a TURN entry with credentials minted per member.
    let ice = IceServers::new(
        vec!["stun:stun.example.org:3478".into()],
        Some(Turn {
            urls: vec!["turn:turn.example.org:3478?transport=udp".to_string()].into(),
            secret: "a-shared-turn-secret".into(),
            ttl: Duration::from_secs(3600),
        }),
    );
    let event = Event::Matched {
        session_id: "s_0123456789abcdef".into(),
        peer: "p_0123456789".into(),
        role: Role::Offerer,
        started_at_ms: 1_764_000_000_000,
        common_interests: vec!["chess".into()],
        media: ice.media("p_9876543210", 1_764_000_000_000),
    };
    c.bench_function("encode/matched_p2p", |b| {
        b.iter(|| encode_event(black_box(&event), Some(42), Some("q-17")))
    });
}

/// One measured match per iteration, between two users who never met (so that anti-repeat,
/// cooldowns and the enqueue rate, all on as by default, never hold a pair back): `waiting`
/// attaches and enqueues first, `arriving` attaches (none of it measured), then the measured
/// `enqueue` of `arriving` pairs them. Both then end, drop their connection and expire (not
/// measured), so that the memory engine does not grow with the iterations.
fn match_step(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let server = RedisProcess::start();
    let engines: [(&str, Arc<dyn Engine>); 2] = [
        ("memory", memory()),
        ("redis", redis(&server.url(), "hotpaths")),
    ];
    let mut group = c.benchmark_group("match_step");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(5));
    for (name, mm) in engines {
        let mut next = 0u64;
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut measured = Duration::ZERO;
                    for _ in 0..iters {
                        next += 1;
                        let pair = [next * 2, next * 2 + 1]
                            .map(|n| (UserId::from(format!("u{n}")), ConnId(n)));
                        let [(waiting, wc), (arriving, ac)] = &pair;
                        mm.attach(waiting, *wc, None).await.expect("attach");
                        mm.attach(arriving, *ac, None).await.expect("attach");
                        mm.enqueue(waiting, Prefs::default(), Default::default(), None)
                            .await
                            .expect("enqueue");
                        let started = Instant::now();
                        let outcome = mm
                            .enqueue(arriving, Prefs::default(), Default::default(), None)
                            .await
                            .expect("enqueue");
                        measured += started.elapsed();
                        assert_eq!(outcome.started.len(), 1, "every step is a match");
                        mm.end(arriving, None).await.expect("end");
                        for (user, conn) in &pair {
                            mm.detach(user, *conn).await.expect("detach");
                            mm.expire(user, *conn).await.expect("expire");
                        }
                    }
                    measured
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode, encode_matched, match_step);
criterion_main!(benches);
