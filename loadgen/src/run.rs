//! Closed-loop load: `c` worker threads take jobs from one queue, as fast as
//! each answer comes back, and time every request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use crate::http::Connection;
use crate::stats::Summary;

/// How many error messages a run keeps as examples.
pub const ERROR_EXAMPLES: usize = 5;

/// What a run did.
#[derive(Clone, Debug)]
pub struct Report {
    /// Latency and throughput figures.
    pub summary: Summary,
    /// The first few error messages, for the operator.
    pub error_examples: Vec<String>,
    /// Jobs left unsent because the time limit was reached.
    pub unsent: usize,
}

/// Run `jobs` on `concurrency` threads.
///
/// Each thread first builds its worker with `make_worker(thread index)`
/// (e.g. its own HTTP connection); then all start together. A worker
/// returns `Err(message)` for a failed request or a wrong answer. With a
/// `time_limit`, workers stop taking jobs once it has passed; the run is
/// bounded in count and in time.
pub fn run<J, W, F>(concurrency: usize, jobs: &[J], time_limit: Option<Duration>, make_worker: F) -> Report
where
    J: Sync,
    F: Fn(usize) -> W + Sync,
    W: FnMut(&J) -> Result<(), String>,
{
    let concurrency = concurrency.max(1);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    // Two rendezvous: every worker is built (connected), then the clock
    // starts, then the work. The clock must start before the first job and
    // after the slowest set-up; the main thread may be scheduled last.
    let ready = Barrier::new(concurrency + 1);
    let go = Barrier::new(concurrency + 1);
    let examples = Mutex::new(Vec::new());
    let per_thread = jobs.len() / concurrency + 1;

    let (latencies, errors, elapsed) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..concurrency)
            .map(|index| {
                let (next, stop, ready, go, examples, make_worker) = (&next, &stop, &ready, &go, &examples, &make_worker);
                scope.spawn(move || {
                    let mut worker = make_worker(index);
                    let mut latencies: Vec<u64> = Vec::with_capacity(per_thread);
                    let mut errors = 0u64;
                    ready.wait();
                    go.wait();
                    let start = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(job) = jobs.get(k) else { break };
                        let t = Instant::now();
                        let result = worker(job);
                        latencies.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
                        if let Err(message) = result {
                            errors += 1;
                            let mut ex = examples.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                            if ex.len() < ERROR_EXAMPLES {
                                ex.push(message);
                            }
                        }
                        if time_limit.is_some_and(|limit| start.elapsed() >= limit) {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    (latencies, errors)
                })
            })
            .collect();
        ready.wait();
        let start = Instant::now();
        go.wait();
        let mut all = Vec::with_capacity(jobs.len());
        let mut errors = 0;
        for h in handles {
            match h.join() {
                Ok((l, e)) => {
                    all.extend(l);
                    errors += e;
                }
                // A panicking worker is a bug in the caller; surface it.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        (all, errors, start.elapsed())
    });
    let sent = latencies.len();
    Report {
        summary: Summary::from_latencies(latencies, errors, elapsed),
        error_examples: examples.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner),
        unsent: jobs.len().saturating_sub(sent),
    }
}

/// [`run`] over HTTP: each thread gets its own keep-alive [`Connection`]
/// to `addr` (reads and writes bounded by `timeout`) and the request
/// function `make_request(thread index)`, which sends one job on it and
/// checks the answer. Returns the report and the TCP connections opened
/// (one per thread when the server keeps connections alive).
pub fn over_http<J, F, R>(
    addr: SocketAddr,
    concurrency: usize,
    jobs: &[J],
    time_limit: Option<Duration>,
    timeout: Duration,
    make_request: F,
) -> (Report, u64)
where
    J: Sync,
    F: Fn(usize) -> R + Sync,
    R: FnMut(&mut Connection, &J) -> Result<(), String>,
{
    /// Adds its connection's count when the worker is dropped (at the end
    /// of its thread).
    struct Counted<'a> {
        conn: Connection,
        connects: &'a AtomicU64,
    }
    impl Drop for Counted<'_> {
        fn drop(&mut self) {
            self.connects.fetch_add(self.conn.stats().connects, Ordering::Relaxed);
        }
    }
    let connects = AtomicU64::new(0);
    let report = run(concurrency, jobs, time_limit, |index| {
        let mut counted = Counted { conn: Connection::new(addr, timeout), connects: &connects };
        let mut request = make_request(index);
        move |job: &J| request(&mut counted.conn, job)
    });
    (report, connects.into_inner())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_job_once_and_errors_counted() {
        let jobs: Vec<u64> = (0..1000).collect();
        let sum = AtomicU64::new(0);
        let workers = AtomicUsize::new(0);
        let report = run(4, &jobs, None, |_| {
            workers.fetch_add(1, Ordering::Relaxed);
            |j: &u64| {
                sum.fetch_add(*j, Ordering::Relaxed);
                if j.is_multiple_of(100) {
                    Err(format!("job {j}"))
                } else {
                    Ok(())
                }
            }
        });
        assert_eq!(workers.load(Ordering::Relaxed), 4);
        assert_eq!(sum.load(Ordering::Relaxed), 999 * 1000 / 2);
        assert_eq!(report.summary.requests, 1000);
        assert_eq!(report.summary.errors, 10);
        assert_eq!(report.error_examples.len(), ERROR_EXAMPLES);
        assert_eq!(report.unsent, 0);
    }

    #[test]
    fn clock_excludes_worker_setup() {
        let jobs = vec![(); 40];
        let report = run(4, &jobs, None, |_| {
            // Slow set-up (a connect, say) is not part of the run.
            std::thread::sleep(Duration::from_secs(1));
            |(): &()| {
                std::thread::sleep(Duration::from_millis(2));
                Ok(())
            }
        });
        // 80 ms of work on 4 threads: at least 20 ms, and nowhere near the set-up.
        let elapsed = report.summary.elapsed;
        assert!(elapsed >= Duration::from_millis(20) && elapsed < Duration::from_secs(1), "{elapsed:?}");
    }

    #[test]
    fn time_limit_stops_the_run() {
        let jobs = vec![(); 10_000];
        let report = run(2, &jobs, Some(Duration::from_millis(30)), |_| {
            |(): &()| {
                std::thread::sleep(Duration::from_millis(1));
                Ok(())
            }
        });
        assert!(report.unsent > 0);
        assert_eq!(report.summary.requests as usize + report.unsent, jobs.len());
        assert!(report.summary.elapsed < Duration::from_secs(5));
    }

    #[test]
    fn over_http_keeps_one_connection_per_thread() {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Two connections, each answering every request head it reads.
        let server = std::thread::spawn(move || {
            let mut threads = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = listener.accept().unwrap();
                threads.push(std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").unwrap();
                        }
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                }));
            }
            for t in threads {
                t.join().unwrap();
            }
        });
        let jobs: Vec<u32> = (0..100).collect();
        let (report, connects) = over_http(addr, 2, &jobs, None, Duration::from_secs(5), |_| {
            |conn: &mut Connection, job: &u32| {
                let r = conn.get(&format!("/x?{job}")).map_err(|e| e.to_string())?;
                if job.is_multiple_of(50) {
                    return Err("every fiftieth fails".to_owned());
                }
                (r.body == b"ok").then_some(()).ok_or_else(|| "wrong body".to_owned())
            }
        });
        assert_eq!((report.summary.requests, report.summary.errors, connects), (100, 2, 2));
        server.join().unwrap();
    }
}
