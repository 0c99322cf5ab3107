//! The cost of one `enqueue` with 0 and with 5,000 unsuitable waiters ahead of it in the same
//! pool, in both engines: the in-memory matchmaker called directly, and the Redis matchmaker
//! against a throw-away `redis-server` this bench starts on a free loopback port.
//!
//! The unsuitable waiters are users who enqueued and then dropped their connection: their queue
//! place is held for a resume, but nobody can be matched with them. Each measured `enqueue`
//! finds nobody to match (the pool holds only such waiters), so it measures the matching
//! attempt itself; the `end` that takes the user out again is not measured.
//!
//! Run: `cargo bench --bench enqueue` (needs `redis-server` on the `PATH`).

mod support;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use matchgate::matching::{ConnId, Engine, UserId};
use matchgate::protocol::Prefs;
use support::{engines_with_waiters, time_enqueue, RedisProcess};

/// Unsuitable waiters ahead of the measured enqueue.
const WAITERS: [usize; 2] = [0, 5_000];

/// `n` users who enqueued in the default pool and then dropped their connection.
async fn fill(mm: &dyn Engine, n: usize) {
    for i in 0..n {
        let user: UserId = format!("gone-{i}").into();
        let conn = ConnId(i as u64 + 1);
        mm.attach(&user, conn, None).await.expect("attach");
        mm.enqueue(&user, Prefs::default(), Default::default(), None)
            .await
            .expect("enqueue");
        mm.detach(&user, conn).await.expect("detach");
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let server = RedisProcess::start();
    let mut group = c.benchmark_group("enqueue");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(5));
    for waiters in WAITERS {
        for (name, mm, probe) in engines_with_waiters(&rt, &server, waiters, fill) {
            group.bench_function(BenchmarkId::new(name, waiters), |b| {
                time_enqueue(b, &rt, mm.as_ref(), &probe, &Prefs::default())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
