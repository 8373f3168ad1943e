//! Criterion benches for the request path's shared state, run from several threads at once
//! (issue #20: "no shared lock on the request path"). Each bench runs the same operation on
//! 1 and 2 threads (this is a 2-core machine; more threads than cores measures the scheduler,
//! not the lock) and reports the wall time for every thread to do `iters` operations: flat
//! from 1 to 2 threads means no contention, a rise is what the threads cost each other.
//!
//! - `contention/metrics_record_http/*`: `Metrics::record_http` (once per request), per-thread
//!   shards (as shipped) and one shard (one process-wide lock, the layout before);
//! - `contention/pool_checkout/*`: `Upstreams::checkout` of a pooled HTTP/1 keep-alive
//!   connection to a real loopback socket and giving it back, per-worker pools (as shipped)
//!   and one pool table;
//! - `contention/access_log_enqueue/*`: `AccessLogger::log` (the bounded queue to the writer
//!   thread) with the writer writing to `io::sink`.
//!
//! CI compiles them (`cargo bench --no-run`); it never times them. Run:
//! `cargo bench -p waypoint-benches --bench contention`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use accesslog::AccessLogger;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use policy::Endpoint;
use proxy::telemetry::metrics::{Metrics, SourceLabels};
use proxy::upstream::{UpstreamProtocol, UpstreamSettings, Upstreams};
use waypoint_benches::model::{Backends, Model, Variant};

const THREADS: [usize; 2] = [1, 2];

/// Run `op(thread, i)` `iters` times on each of `threads` threads started together; the wall
/// time until the last one finishes.
fn on_threads<S: Sync>(
    threads: usize,
    iters: u64,
    state: &S,
    op: impl Fn(&S, usize, u64) + Sync,
) -> Duration {
    let start = Barrier::new(threads + 1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (start, op) = (&start, &op);
                scope.spawn(move || {
                    start.wait();
                    for i in 0..iters {
                        op(state, t, i);
                    }
                })
            })
            .collect();
        start.wait();
        let began = Instant::now();
        for h in handles {
            let _ = h.join();
        }
        began.elapsed()
    })
}

fn metrics(c: &mut Criterion) {
    // The bench configuration's reviews cluster, as a request would carry it.
    let yaml = Model::new(Variant::BASE, &Backends::default()).waypoint_manifests();
    let loaded = policy::parse_manifests(&yaml, "bench.yaml").expect("bench config parses");
    let snapshot = policy::compile(&loaded, &policy::CompileOptions::default())
        .expect("bench config compiles");
    let vip: SocketAddr = "10.0.0.10:9080".parse().expect("vip");
    let cluster = match snapshot.lookup_vip(vip) {
        policy::VipLookup::Bound(sp) => sp.cluster.clone(),
        _ => panic!("reviews VIP not bound"),
    };
    let r = waypoint_benches::sample_access_log_record();
    let mut g = c.benchmark_group("contention/metrics_record_http");
    for (layout, shards) in [
        ("per_thread", proxy::sharded::default_shards()),
        ("one_lock", 1),
    ] {
        let m = Metrics::with_shards(shards);
        let source = m.source(SourceLabels::from_tunnel(None, None), 16);
        // The chosen endpoint's workload, looked up per request as the request path does.
        let workload = policy::EndpointWorkload {
            namespace: "default".into(),
            names: policy::resources::WorkloadNames {
                workload: "reviews-v1".into(),
                canonical_service: "reviews".into(),
                canonical_revision: "v1".into(),
                app: Some("reviews".into()),
                version: Some("v1".into()),
            },
            principal: Some("spiffe://cluster.local/ns/default/sa/reviews".into()),
            metrics_id: Default::default(),
        };
        for threads in THREADS {
            g.bench_function(
                BenchmarkId::new(layout, format!("{threads}_threads")),
                |b| {
                    b.iter_custom(|iters| {
                        on_threads(threads, iters, &m, |m, _, _| {
                            let dest = m.destination(Some(black_box(&workload)), "Kubernetes", 16);
                            m.record_http(source, dest, Some(&cluster), black_box(&r), false, None)
                        })
                    })
                },
            );
        }
    }
    g.finish();
}

fn pool_checkout(c: &mut Criterion) {
    // A real loopback peer that accepts and holds connections; give_back returns them unused,
    // so it never has to answer.
    let accept_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let listener = accept_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = std::thread::spawn(move || {
        accept_rt.block_on(async move {
            let mut held = Vec::new();
            // Bounded: a pool opens a connection only when none is idle, so a thread holds
            // at most one at a time (per runtime and layout).
            while held.len() < 1024 {
                match listener.accept().await {
                    Ok((s, _)) => held.push(s),
                    Err(_) => break,
                }
            }
        })
    });
    let endpoint = Endpoint::new(addr, None, None);
    let mut g = c.benchmark_group("contention/pool_checkout");
    for (layout, shards) in [
        ("per_worker", proxy::sharded::default_shards()),
        ("one_table", 1),
    ] {
        let upstreams = Arc::new(Upstreams::with_pool_shards(
            UpstreamSettings::default(),
            shards,
        ));
        for threads in THREADS {
            // A runtime with one worker per thread, as the waypoint's: the connection tasks
            // and the checkouts run on its workers, one task per worker.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()
                .expect("runtime");
            g.bench_function(
                BenchmarkId::new(layout, format!("{threads}_threads")),
                |b| {
                    b.iter_custom(|iters| {
                        rt.block_on(checkouts(&upstreams, &endpoint, threads, iters))
                    })
                },
            );
        }
    }
    g.finish();
    drop(acceptor);
}

/// `threads` tasks each checking out and giving back a pooled connection `iters` times; the
/// wall time until all are done.
async fn checkouts(
    upstreams: &Arc<Upstreams>,
    endpoint: &Endpoint,
    threads: usize,
    iters: u64,
) -> Duration {
    let began = Instant::now();
    let tasks: Vec<_> = (0..threads)
        .map(|_| {
            let (u, e) = (upstreams.clone(), endpoint.clone());
            tokio::spawn(async move {
                for _ in 0..iters {
                    match u
                        .checkout(&e, UpstreamProtocol::Http1, Default::default())
                        .await
                    {
                        Ok(conn) => conn.give_back(),
                        Err(_) => panic!("loopback connect failed"),
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    began.elapsed()
}

fn access_log(c: &mut Criterion) {
    let logger = AccessLogger::spawn(Box::new(std::io::sink()));
    let mut g = c.benchmark_group("contention/access_log_enqueue");
    for threads in THREADS {
        g.bench_function(
            BenchmarkId::new("queue", format!("{threads}_threads")),
            |b| {
                b.iter_custom(|iters| {
                    on_threads(threads, iters, &logger, |l, _, _| {
                        l.log(waypoint_benches::sample_access_log_record())
                    })
                })
            },
        );
    }
    g.finish();
    // A full queue drops (and counts) instead of blocking; say how often that happened,
    // because a dropped record is cheaper than a queued one.
    eprintln!(
        "access_log_enqueue: {} records written, {} dropped (queue full)",
        logger.written(),
        logger.dropped()
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3));
    targets = metrics, pool_checkout, access_log
}
criterion_main!(benches);
