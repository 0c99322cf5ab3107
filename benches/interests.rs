//! The cost of one `enqueue` with interests `["x"]` when 10, 1,000 or 100,000 users wait in
//! the same pool with other interests (issue 12), in both engines: the in-memory matchmaker
//! called directly, and the Redis matchmaker (one `FCALL`) against a throw-away
//! `redis-server` this bench starts on a free loopback port.
//!
//! Each waiter is connected and has one interest of its own (`t<i>`), so no two waiters share
//! one; nobody's interests wait runs out during the bench (the bench fires no timers), so no
//! waiter is open. A search by a user with interests visits only the lists of its own tags:
//! the measured `enqueue` finds nobody, and its cost should not depend on the waiters. For
//! contrast, the same enqueue without interests (an open user, who searches the open list:
//! also empty). The `end` that takes the probe out again is not measured.
//!
//! Run: `cargo bench --bench interests` (needs `redis-server` on the `PATH`).

mod support;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use matchgate::matching::{ConnId, Engine, UserId};
use matchgate::protocol::Prefs;
use support::{engines_with_waiters, time_enqueue, RedisProcess};

/// Users waiting in other tags.
const WAITERS: [usize; 3] = [10, 1_000, 100_000];

fn interests(tags: &[String]) -> Prefs {
    Prefs {
        interests: tags.to_vec(),
        ..Prefs::default()
    }
}

/// `n` connected users waiting in the default pool, each with an interest of its own.
async fn fill(mm: &dyn Engine, n: usize) {
    for i in 0..n {
        let user: UserId = format!("w{i}").into();
        mm.attach(&user, ConnId(i as u64 + 1), None)
            .await
            .expect("attach");
        mm.enqueue(
            &user,
            interests(&[format!("t{i}")]),
            Default::default(),
            None,
        )
        .await
        .expect("enqueue");
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let server = RedisProcess::start();
    let mut group = c.benchmark_group("enqueue_interests");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(5));
    let probes = [
        ("x", interests(&["x".to_string()])),
        ("none", Prefs::default()),
    ];
    for waiters in WAITERS {
        for (name, mm, probe) in engines_with_waiters(&rt, &server, waiters, fill) {
            for (kind, prefs) in &probes {
                let id = BenchmarkId::new(format!("{name}/{kind}"), waiters);
                group.bench_function(id, |b| time_enqueue(b, &rt, mm.as_ref(), &probe, prefs));
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
