//! The counter-replication state machine driven by a deterministic simulator:
//! two sites (A, B) or three (A, B and the witness W), each a
//! [`Machine`] plus an in-memory durable counter store, joined by a network
//! with a fake clock that delays, drops, duplicates and reorders messages
//! and cuts links, and sites that crash (volatile state lost, the store
//! kept) and restart.
//!
//! Fixed scenarios first, then the invariant over thousands of seeded random
//! schedules. `QUORUM_SCHEDULES=n` changes the number of schedules,
//! `QUORUM_SEED=s` replays one.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use otp::{Counters, PublicId};
use replication::quorum::{
    peer_cas, Action, CasDecision, ConfigError, Event, IgnoredReason, Input, Machine, Message, OtpDigest, PeerCasResult, Policy, Proposal,
    QuorumConfig, ReplyOutcome, RequestId, SiteId, StoredCounters, Verdict,
};

mod common;

use common::model::{apply_peer_cas, local_cas, LocalVerdict, Rng, Store};

const A: SiteId = SiteId(1);
const B: SiteId = SiteId(2);
const W: SiteId = SiteId(3);

const DEADLINE: Duration = Duration::from_millis(50);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---------------------------------------------------------------------------
// OTPs and the validator's local compare-and-set.

#[derive(Clone, Debug, PartialEq, Eq)]
struct Otp {
    public_id: PublicId,
    counters: Counters,
    digest: OtpDigest,
}

fn key(n: u64) -> PublicId {
    PublicId::from_number(n, 6).unwrap()
}

fn otp(key_no: u64, counter: u16, session_use: u8) -> Otp {
    otp_variant(key_no, counter, session_use, 0)
}

/// `variant` stands for a different OTP string with the same counters.
fn otp_variant(key_no: u64, counter: u16, session_use: u8, variant: u8) -> Otp {
    let mut d = [0u8; 32];
    d[..8].copy_from_slice(&key_no.to_be_bytes());
    d[8..10].copy_from_slice(&counter.to_be_bytes());
    d[10] = session_use;
    d[11] = variant;
    Otp { public_id: key(key_no), counters: Counters::new(counter, session_use).unwrap(), digest: OtpDigest(d) }
}

// ---------------------------------------------------------------------------
// The simulator.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    TwoSites,
    Witness,
}

#[derive(Clone, Debug)]
struct Faults {
    latency: (Duration, Duration),
    fsync: (Duration, Duration),
    drop: f64,
    duplicate: f64,
    /// Chance that a write in flight when its site crashes reached the disk.
    write_survives_crash: f64,
}

impl Faults {
    fn none() -> Self {
        Self { latency: (ms(2), ms(2)), fsync: (ms(1), ms(1)), drop: 0.0, duplicate: 0.0, write_survives_crash: 0.5 }
    }
}

#[derive(Clone, Debug)]
struct Submission {
    site: SiteId,
    otp: Otp,
    nonce: String,
    sync_level: Option<u8>,
    timeout: Option<Duration>,
    at: Instant,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// The site crashed (or was down) before answering.
    NoAnswer,
    Local(LocalVerdict),
    Quorum(Verdict),
}

#[derive(Clone, Debug)]
struct Answer {
    outcome: Outcome,
    /// Real-time order of arrival and answer: the simulator's step numbers.
    arrived_step: u64,
    answered_step: u64,
    answered_at: Instant,
    /// When the machine was told about the local compare-and-set.
    fed_at: Option<Instant>,
}

#[derive(Debug)]
enum Ev {
    Arrive { sub: usize },
    LocalCas { sub: usize, incarnation: u32 },
    FeedLocal { sub: usize, incarnation: u32, req_id: RequestId },
    Deliver { from: SiteId, to: SiteId, message: Message },
    PeerCas { site: SiteId, incarnation: u32, origin: SiteId, req_id: RequestId, proposal: Proposal },
    FeedCasDone { site: SiteId, incarnation: u32, origin: SiteId, req_id: RequestId, result: PeerCasResult },
    Timer { site: SiteId, incarnation: u32 },
    Crash { site: SiteId },
    Restart { site: SiteId },
    Cut { a: SiteId, b: SiteId },
    Heal { a: SiteId, b: SiteId },
    PeerUp { site: SiteId, peer: SiteId },
}

struct Site {
    config: QuorumConfig,
    machine: Option<Machine>,
    store: Store,
    incarnation: u32,
}

struct Sim {
    rng: Rng,
    faults: Faults,
    topology: Topology,
    t0: Instant,
    now: Instant,
    step: u64,
    seq: u64,
    queue: BTreeMap<(Instant, u64), Ev>,
    sites: BTreeMap<SiteId, Site>,
    cut: BTreeSet<(SiteId, SiteId)>,
    subs: Vec<Submission>,
    /// Per submission: its answer, and its arrival step.
    answers: BTreeMap<usize, Answer>,
    arrived: BTreeMap<usize, u64>,
    fed: BTreeMap<usize, Instant>,
    requests: BTreeMap<RequestId, usize>,
    next_req: u64,
    events: Vec<(SiteId, Event)>,
}

impl Sim {
    fn new(topology: Topology, seed: u64, faults: Faults, configure: impl Fn(&mut QuorumConfig)) -> Self {
        let mut configs = match topology {
            Topology::TwoSites => vec![(A, QuorumConfig::two_sites(B, DEADLINE)), (B, QuorumConfig::two_sites(A, DEADLINE))],
            Topology::Witness => vec![
                (A, QuorumConfig::with_witness(B, W, DEADLINE)),
                (B, QuorumConfig::with_witness(A, W, DEADLINE)),
                (W, QuorumConfig::witness_of(A, B, DEADLINE)),
            ],
        };
        let mut sites = BTreeMap::new();
        for (id, config) in &mut configs {
            configure(config);
            let machine = Machine::new(*id, config.clone()).unwrap();
            sites.insert(*id, Site { config: config.clone(), machine: Some(machine), store: Store::new(), incarnation: 0 });
        }
        let t0 = Instant::now();
        Self {
            rng: Rng(seed),
            faults,
            topology,
            t0,
            now: t0,
            step: 0,
            seq: 0,
            queue: BTreeMap::new(),
            sites,
            cut: BTreeSet::new(),
            subs: Vec::new(),
            answers: BTreeMap::new(),
            arrived: BTreeMap::new(),
            fed: BTreeMap::new(),
            requests: BTreeMap::new(),
            next_req: 1,
            events: Vec::new(),
        }
    }

    /// Change every node's configuration (before anything ran).
    fn reconfigure(&mut self, f: impl Fn(&mut QuorumConfig)) {
        for (id, site) in &mut self.sites {
            f(&mut site.config);
            site.machine = Some(Machine::new(*id, site.config.clone()).unwrap());
        }
    }

    fn at(&self, offset: Duration) -> Instant {
        self.t0 + offset
    }

    fn schedule(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at.max(self.now), self.seq), ev);
    }

    fn submit_full(
        &mut self,
        offset: Duration,
        site: SiteId,
        otp: &Otp,
        nonce: &str,
        sync_level: Option<u8>,
        timeout: Option<Duration>,
    ) -> usize {
        let at = self.at(offset);
        self.subs.push(Submission { site, otp: otp.clone(), nonce: nonce.to_owned(), sync_level, timeout, at });
        let sub = self.subs.len() - 1;
        self.schedule(at, Ev::Arrive { sub });
        sub
    }

    fn submit(&mut self, offset: Duration, site: SiteId, otp: &Otp, nonce: &str) -> usize {
        self.submit_full(offset, site, otp, nonce, None, None)
    }

    /// A submission with, now and then, a sync level or a timeout.
    fn submit_random(&mut self, offset: Duration, site: SiteId, otp: &Otp, nonce: &str) -> usize {
        let sync_level = if self.rng.chance(0.2) { Some(self.rng.pick(&[0u8, 1, 40, 60, 100])) } else { None };
        let timeout = if self.rng.chance(0.1) { Some(self.rng.pick(&[ms(0), ms(10), ms(1000)])) } else { None };
        self.submit_full(offset, site, otp, nonce, sync_level, timeout)
    }

    fn crash(&mut self, offset: Duration, site: SiteId) {
        self.schedule(self.at(offset), Ev::Crash { site });
    }

    fn restart(&mut self, offset: Duration, site: SiteId) {
        self.schedule(self.at(offset), Ev::Restart { site });
    }

    fn cut(&mut self, offset: Duration, a: SiteId, b: SiteId) {
        self.schedule(self.at(offset), Ev::Cut { a, b });
    }

    fn heal(&mut self, offset: Duration, a: SiteId, b: SiteId) {
        self.schedule(self.at(offset), Ev::Heal { a, b });
    }

    fn is_cut(&self, a: SiteId, b: SiteId) -> bool {
        self.cut.contains(&(a.min(b), a.max(b)))
    }

    fn up(&self, site: SiteId) -> bool {
        self.sites[&site].machine.is_some()
    }

    fn incarnation(&self, site: SiteId) -> u32 {
        self.sites[&site].incarnation
    }

    fn outcome(&self, sub: usize) -> Outcome {
        self.answers.get(&sub).map_or(Outcome::NoAnswer, |a| a.outcome.clone())
    }

    fn answer(&mut self, sub: usize, outcome: Outcome) {
        let previous = self.answers.insert(
            sub,
            Answer {
                outcome: outcome.clone(),
                arrived_step: self.arrived[&sub],
                answered_step: self.step,
                answered_at: self.now,
                fed_at: self.fed.get(&sub).copied(),
            },
        );
        assert!(previous.is_none(), "submission {sub} answered twice: {previous:?} then {outcome:?}");
    }

    fn run(&mut self) {
        self.run_until(Duration::from_secs(3600));
        assert!(self.queue.is_empty(), "the simulation does not terminate");
    }

    /// Process everything scheduled up to `offset` from the start.
    fn run_until(&mut self, offset: Duration) {
        let end = self.at(offset);
        while self.queue.first_key_value().is_some_and(|((at, _), _)| *at <= end) {
            let Some(((at, _), ev)) = self.queue.pop_first() else { break };
            self.now = at;
            self.step += 1;
            self.process(ev);
        }
    }

    fn process(&mut self, ev: Ev) {
        match ev {
            Ev::Arrive { sub } => {
                self.arrived.insert(sub, self.step);
                let site = self.subs[sub].site;
                if self.up(site) {
                    let fsync = self.rng.between(self.faults.fsync.0, self.faults.fsync.1);
                    let incarnation = self.incarnation(site);
                    self.schedule(self.now + fsync, Ev::LocalCas { sub, incarnation });
                }
            }
            Ev::LocalCas { sub, incarnation } => {
                let s = self.subs[sub].clone();
                let proposal =
                    Proposal { public_id: s.otp.public_id, counters: s.otp.counters, nonce: s.nonce.clone(), otp_digest: s.otp.digest };
                let alive = self.incarnation(s.site) == incarnation;
                if !alive && !self.rng.chance(self.faults.write_survives_crash) {
                    return;
                }
                let result = local_cas(&mut self.sites.get_mut(&s.site).unwrap().store, &proposal);
                if !alive {
                    return;
                }
                match result {
                    Err(v) => self.answer(sub, Outcome::Local(v)),
                    Ok(()) => {
                        // The validator then calls its PeerSync hook: a gap
                        // in which a crash leaves the counter burned here only.
                        let req_id = RequestId(self.next_req);
                        self.next_req += 1;
                        self.requests.insert(req_id, sub);
                        let gap = self.rng.between(Duration::ZERO, ms(1));
                        self.schedule(self.now + gap, Ev::FeedLocal { sub, incarnation, req_id });
                    }
                }
            }
            Ev::FeedLocal { sub, incarnation, req_id } => {
                let s = self.subs[sub].clone();
                if self.incarnation(s.site) != incarnation {
                    return;
                }
                self.fed.insert(sub, self.now);
                let proposal = Proposal { public_id: s.otp.public_id, counters: s.otp.counters, nonce: s.nonce, otp_digest: s.otp.digest };
                let input = Input::LocalAccepted { req_id, proposal, sync_level: s.sync_level, timeout: s.timeout };
                self.feed(s.site, input);
            }
            Ev::Deliver { from, to, message } => {
                if self.up(to) && !self.is_cut(from, to) {
                    self.feed(to, Input::Message { from, message });
                }
            }
            Ev::PeerCas { site, incarnation, origin, req_id, proposal } => {
                let alive = self.incarnation(site) == incarnation;
                if !alive && !self.rng.chance(self.faults.write_survives_crash) {
                    return;
                }
                let result = apply_peer_cas(&mut self.sites.get_mut(&site).unwrap().store, &proposal);
                if alive {
                    // Durable now; the reply leaves a moment later (a crash in
                    // between keeps the write and loses the reply).
                    let gap = self.rng.between(Duration::ZERO, ms(1));
                    self.schedule(self.now + gap, Ev::FeedCasDone { site, incarnation, origin, req_id, result });
                }
            }
            Ev::FeedCasDone { site, incarnation, origin, req_id, result } => {
                if self.incarnation(site) == incarnation {
                    self.feed(site, Input::PeerCasDone { origin, req_id, result });
                }
            }
            Ev::Timer { site, incarnation } => {
                if self.incarnation(site) == incarnation {
                    self.feed(site, Input::Tick);
                }
            }
            Ev::Crash { site } => {
                let s = self.sites.get_mut(&site).unwrap();
                if s.machine.take().is_some() {
                    s.incarnation += 1;
                }
            }
            Ev::Restart { site } => {
                let s = self.sites.get_mut(&site).unwrap();
                if s.machine.is_none() {
                    s.machine = Some(Machine::new(site, s.config.clone()).unwrap());
                }
            }
            Ev::Cut { a, b } => {
                self.cut.insert((a.min(b), a.max(b)));
            }
            Ev::Heal { a, b } => {
                self.cut.remove(&(a.min(b), a.max(b)));
                for (site, peer) in [(a, b), (b, a)] {
                    self.schedule(self.now, Ev::PeerUp { site, peer });
                }
            }
            Ev::PeerUp { site, peer } => {
                if self.up(site) && self.sites[&site].config.others().any(|s| s == peer) {
                    self.feed(site, Input::PeerUp { site: peer });
                }
            }
        }
    }

    fn feed(&mut self, site: SiteId, input: Input) {
        let now = self.now;
        let actions = self.sites.get_mut(&site).unwrap().machine.as_mut().unwrap().handle(now, input);
        let incarnation = self.incarnation(site);
        for action in actions {
            match action {
                Action::Send { to, message } => self.send(site, to, message),
                Action::DurableCas { origin, req_id, proposal } => {
                    let fsync = self.rng.between(self.faults.fsync.0, self.faults.fsync.1);
                    self.schedule(now + fsync, Ev::PeerCas { site, incarnation, origin, req_id, proposal });
                }
                Action::Answer { req_id, verdict } => {
                    let sub = self.requests[&req_id];
                    assert_eq!(self.subs[sub].site, site, "answered by the wrong site");
                    self.answer(sub, Outcome::Quorum(verdict));
                }
                Action::SetTimer { at } => self.schedule(at, Ev::Timer { site, incarnation }),
                Action::Event(e) => self.events.push((site, e)),
            }
        }
    }

    fn send(&mut self, from: SiteId, to: SiteId, message: Message) {
        if self.is_cut(from, to) || self.rng.chance(self.faults.drop) {
            return;
        }
        let copies = if self.rng.chance(self.faults.duplicate) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = self.rng.between(self.faults.latency.0, self.faults.latency.1);
            self.schedule(self.now + delay, Ev::Deliver { from, to, message: message.clone() });
        }
    }

    fn count_events(&self, f: impl Fn(&Event) -> bool) -> usize {
        self.events.iter().filter(|(_, e)| f(e)).count()
    }

    /// The safety invariant over everything answered so far; `Err` describes
    /// the first violation.
    fn check(&self) -> Result<(), String> {
        #[derive(Debug)]
        struct Accepted<'a> {
            sub: usize,
            s: &'a Submission,
            a: &'a Answer,
        }
        let mut by_key: BTreeMap<PublicId, Vec<Accepted<'_>>> = BTreeMap::new();
        for (&sub, a) in &self.answers {
            let s = &self.subs[sub];
            if let Outcome::Quorum(Verdict::Accepted { .. }) = a.outcome {
                by_key.entry(s.otp.public_id).or_default().push(Accepted { sub, s, a });
            }
            // Every quorum answer comes within the deadline of the request
            // (a shorter `timeout` only makes it earlier).
            if let (Outcome::Quorum(_), Some(fed)) = (&a.outcome, a.fed_at) {
                if a.answered_at > fed + DEADLINE {
                    return Err(format!("submission {sub} answered {:?} after its deadline", a.answered_at - fed));
                }
            }
        }
        for accepted in by_key.values_mut() {
            // No OTP value accepted twice, except the very same request at
            // several sites (once per site).
            for (i, x) in accepted.iter().enumerate() {
                for y in &accepted[i + 1..] {
                    if x.s.otp.counters != y.s.otp.counters {
                        continue;
                    }
                    let same_request = x.s.otp.digest == y.s.otp.digest && x.s.nonce == y.s.nonce;
                    if !same_request || x.s.site == y.s.site {
                        return Err(format!("accepted twice: {x:?} and {y:?}"));
                    }
                }
            }
            // Nothing lower accepted after something higher: in real time,
            // no acceptance of a request that arrived after a higher value
            // was answered accepted (linearizability).
            for x in accepted.iter() {
                for y in accepted.iter() {
                    if x.s.otp.counters > y.s.otp.counters && x.a.answered_step < y.a.arrived_step {
                        return Err(format!("{y:?} accepted after the higher {x:?} was answered"));
                    }
                }
            }
            // Two sites, write-all: the acceptances themselves are in
            // counter order.
            if self.topology == Topology::TwoSites {
                accepted.sort_by_key(|x| x.a.answered_step);
                for pair in accepted.windows(2) {
                    if pair[1].s.otp.counters < pair[0].s.otp.counters {
                        return Err(format!(
                            "{:?} (sub {}) accepted after the higher {:?} (sub {})",
                            pair[1].s.otp.counters, pair[1].sub, pair[0].s.otp.counters, pair[0].sub
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn accepted(o: &Outcome) -> bool {
    matches!(o, Outcome::Quorum(Verdict::Accepted { .. }))
}

fn no_faults(topology: Topology) -> Sim {
    Sim::new(topology, 1, Faults::none(), |_| {})
}

// ---------------------------------------------------------------------------
// Fixed scenarios.

#[test]
fn same_request_at_both_sites_is_ok_at_both() {
    for topology in [Topology::TwoSites, Topology::Witness] {
        let mut sim = no_faults(topology);
        let o = otp(1, 5, 0);
        let at_a = sim.submit(ms(0), A, &o, "pamnonce0000000001");
        let at_b = sim.submit(ms(0), B, &o, "pamnonce0000000001");
        sim.run();
        let sl = if topology == Topology::TwoSites { 100 } else { 66 };
        assert_eq!(sim.outcome(at_a), Outcome::Quorum(Verdict::Accepted { sl }), "{topology:?}");
        // With a witness B may hear W's ack before A's: sl 66 or 100.
        assert!(accepted(&sim.outcome(at_b)), "{topology:?}: {:?}", sim.outcome(at_b));
        sim.check().unwrap();
        // The next OTP is accepted as usual.
        let next = sim.submit(ms(200), B, &otp(1, 5, 1), "pamnonce0000000002");
        sim.run();
        assert!(accepted(&sim.outcome(next)));
    }
}

#[test]
fn same_request_reaching_one_site_late_still_logs_in() {
    // The peer compare-and-set reaches B before B's own request: B's local
    // store says REPLAYED_REQUEST (pam_yubico waits on it), A says OK.
    let mut sim = no_faults(Topology::TwoSites);
    let o = otp(1, 9, 3);
    let at_a = sim.submit(ms(0), A, &o, "samenonce12345678");
    let at_b = sim.submit(ms(10), B, &o, "samenonce12345678");
    sim.run();
    assert_eq!(sim.outcome(at_a), Outcome::Quorum(Verdict::Accepted { sl: 100 }));
    assert_eq!(sim.outcome(at_b), Outcome::Local(LocalVerdict::ReplayedRequest));
    sim.check().unwrap();
}

#[test]
fn same_otp_with_different_nonces_is_ok_at_most_once() {
    for topology in [Topology::TwoSites, Topology::Witness] {
        for offset in 0..25 {
            let mut sim = no_faults(topology);
            let o = otp(1, 7, 0);
            let x = sim.submit(ms(0), A, &o, "nonceaaaaaaaaaaaaa");
            let y = sim.submit(ms(offset), B, &o, "noncebbbbbbbbbbbbb");
            sim.run();
            let oks = [x, y].iter().filter(|s| accepted(&sim.outcome(**s))).count();
            assert!(oks <= 1, "{topology:?} offset {offset} ms: {:?} {:?}", sim.outcome(x), sim.outcome(y));
            if offset == 0 {
                // Truly concurrent: each site refuses the other's; nobody wins.
                assert_eq!(oks, 0);
                assert_eq!(sim.outcome(x), Outcome::Quorum(Verdict::Replayed));
                assert!(sim.count_events(|e| matches!(e, Event::PeerRefused { .. })) >= 2);
            }
            if offset >= 10 {
                // A decided first: B's local store already holds it.
                assert!(accepted(&sim.outcome(x)));
                assert_eq!(sim.outcome(y), Outcome::Local(LocalVerdict::ReplayedOtp));
            }
            sim.check().unwrap();
        }
    }
}

#[test]
fn equal_counters_from_another_otp_string_are_not_the_same_request() {
    let mut sim = no_faults(Topology::TwoSites);
    let genuine = otp_variant(1, 3, 0, 0);
    let forged = otp_variant(1, 3, 0, 1);
    let x = sim.submit(ms(0), A, &genuine, "onenonceforboth0");
    let y = sim.submit(ms(0), B, &forged, "onenonceforboth0");
    sim.run();
    assert_eq!(sim.outcome(x), Outcome::Quorum(Verdict::Replayed));
    assert_eq!(sim.outcome(y), Outcome::Quorum(Verdict::Replayed));
    sim.check().unwrap();
}

#[test]
fn replay_at_the_other_site_after_ok_is_refused() {
    for topology in [Topology::TwoSites, Topology::Witness] {
        let mut sim = no_faults(topology);
        let o = otp(2, 40, 2);
        let first = sim.submit(ms(0), A, &o, "firstnonce000000");
        sim.run();
        assert!(accepted(&sim.outcome(first)));
        let replay_b = sim.submit(ms(100), B, &o, "attackernonce000");
        let replay_b_same = sim.submit(ms(150), B, &o, "firstnonce000000");
        let replay_a = sim.submit(ms(200), A, &o, "attackernonce001");
        // An older OTP of the same key, never used, is refused too.
        let older = sim.submit(ms(250), B, &otp(2, 40, 1), "oldernonce000000");
        sim.run();
        assert_eq!(sim.outcome(replay_b), Outcome::Local(LocalVerdict::ReplayedOtp));
        assert_eq!(sim.outcome(replay_b_same), Outcome::Local(LocalVerdict::ReplayedRequest));
        assert_eq!(sim.outcome(replay_a), Outcome::Local(LocalVerdict::ReplayedOtp));
        assert_eq!(sim.outcome(older), Outcome::Local(LocalVerdict::ReplayedOtp));
        sim.check().unwrap();
    }
}

#[test]
fn replay_at_a_site_that_missed_the_update_is_refused_by_the_quorum() {
    // With a witness, A and W accept while B is cut off; B's local store
    // does not know the OTP, but W refuses B's compare-and-set.
    let mut sim = no_faults(Topology::Witness);
    sim.cut(ms(0), A, B);
    sim.cut(ms(0), B, W);
    let o = otp(3, 1, 0);
    let first = sim.submit(ms(1), A, &o, "nonce-one-000000");
    sim.heal(ms(100), B, W);
    let replay = sim.submit(ms(120), B, &o, "nonce-two-000000");
    sim.run();
    assert_eq!(sim.outcome(first), Outcome::Quorum(Verdict::Accepted { sl: 66 }));
    assert_eq!(sim.outcome(replay), Outcome::Quorum(Verdict::Replayed));
    assert_eq!(sim.count_events(|e| matches!(e, Event::PeerRefused { from: W, .. })), 1);
    sim.check().unwrap();
}

#[test]
fn partition_without_witness_fails_closed_within_the_deadline() {
    let mut sim = no_faults(Topology::TwoSites);
    sim.cut(ms(0), A, B);
    let x = sim.submit(ms(10), A, &otp(1, 1, 0), "nonce-a-00000000");
    let y = sim.submit(ms(10), B, &otp(1, 1, 1), "nonce-b-00000000");
    sim.run();
    for sub in [x, y] {
        assert_eq!(sim.outcome(sub), Outcome::Quorum(Verdict::NotEnoughAnswers { sl: 50 }));
        let a = &sim.answers[&sub];
        // Exactly at the deadline: not earlier (the other site could still
        // have said OK), not later.
        assert_eq!(a.answered_at, a.fed_at.unwrap() + DEADLINE);
        assert!(a.answered_at <= sim.subs[sub].at + ms(2) + DEADLINE);
    }
    assert_eq!(sim.count_events(|e| matches!(e, Event::QuorumFailed { acks: 1, required: 2, .. })), 2);
    // Healed: the OTP burned at B alone is refused at A through B; a new
    // OTP works.
    sim.heal(ms(200), A, B);
    let burned = sim.submit(ms(210), A, &otp(1, 1, 1), "nonce-c-00000000");
    let fresh = sim.submit(ms(300), A, &otp(1, 1, 2), "nonce-d-00000000");
    sim.run();
    assert_eq!(sim.outcome(burned), Outcome::Quorum(Verdict::Replayed));
    assert!(accepted(&sim.outcome(fresh)));
    sim.check().unwrap();
}

#[test]
fn partition_with_witness_majority_keeps_accepting_minority_fails_closed() {
    let mut sim = no_faults(Topology::Witness);
    // A is isolated; B and W form the majority.
    sim.cut(ms(0), A, B);
    sim.cut(ms(0), A, W);
    let mut majority = Vec::new();
    let mut minority = Vec::new();
    for i in 0..5u8 {
        let t = ms(10 + 100 * u64::from(i));
        majority.push(sim.submit(t, B, &otp(1, 2, 2 * i), &format!("maj-nonce-{i:06}")));
        minority.push(sim.submit(t, A, &otp(2, 2, i), &format!("min-nonce-{i:06}")));
    }
    // pam_yubico's fan-out during the partition: the majority answers OK
    // first; the minority never answers before its deadline.
    let o = otp(1, 3, 0);
    let fan_b = sim.submit(ms(700), B, &o, "fan-out-nonce-000");
    let fan_a = sim.submit(ms(700), A, &o, "fan-out-nonce-000");
    sim.run();
    for s in &majority {
        assert_eq!(sim.outcome(*s), Outcome::Quorum(Verdict::Accepted { sl: 66 }));
    }
    for s in &minority {
        assert_eq!(sim.outcome(*s), Outcome::Quorum(Verdict::NotEnoughAnswers { sl: 33 }));
    }
    assert!(accepted(&sim.outcome(fan_b)));
    assert_eq!(sim.outcome(fan_a), Outcome::Quorum(Verdict::NotEnoughAnswers { sl: 33 }));
    assert!(sim.answers[&fan_b].answered_at < sim.answers[&fan_a].answered_at);

    // Only the A–B link cut: both sites keep working through W.
    let mut sim = no_faults(Topology::Witness);
    sim.cut(ms(0), A, B);
    let x = sim.submit(ms(10), A, &otp(1, 1, 0), "link-cut-nonce-01");
    let y = sim.submit(ms(100), B, &otp(1, 1, 1), "link-cut-nonce-02");
    let z = sim.submit(ms(200), A, &otp(1, 1, 1), "link-cut-nonce-03");
    sim.run();
    assert!(accepted(&sim.outcome(x)));
    assert!(accepted(&sim.outcome(y)));
    assert_eq!(sim.outcome(z), Outcome::Quorum(Verdict::Replayed));
    sim.check().unwrap();
}

#[test]
fn witness_down_two_sites_carry_on() {
    let mut sim = no_faults(Topology::Witness);
    sim.crash(ms(0), W);
    let x = sim.submit(ms(10), A, &otp(1, 1, 0), "witness-down-0001");
    let y = sim.submit(ms(100), B, &otp(1, 1, 1), "witness-down-0002");
    sim.restart(ms(150), W);
    sim.crash(ms(160), B);
    let z = sim.submit(ms(200), A, &otp(1, 1, 2), "witness-down-0003");
    sim.run();
    for s in [x, y, z] {
        assert_eq!(sim.outcome(s), Outcome::Quorum(Verdict::Accepted { sl: 66 }));
    }
    sim.check().unwrap();
}

#[test]
fn crash_between_the_local_and_the_remote_cas() {
    // 1. The origin crashes right after its local compare-and-set, before
    //    the machine hears of it: the counter is burned at A only.
    let faults = Faults { write_survives_crash: 1.0, ..Faults::none() };
    let mut sim = Sim::new(Topology::TwoSites, 7, faults.clone(), |_| {});
    let o = otp(1, 10, 0);
    let lost = sim.submit(ms(0), A, &o, "crash-nonce-0001");
    sim.crash(ms(1), A); // after the 1 ms fsync, before FeedLocal
    sim.restart(ms(100), A);
    let replay_b = sim.submit(ms(150), B, &o, "crash-nonce-0002");
    let replay_a = sim.submit(ms(250), A, &o, "crash-nonce-0003");
    let next = sim.submit(ms(350), B, &otp(1, 10, 1), "crash-nonce-0004");
    sim.run_until(ms(100));
    assert_eq!(sim.sites[&A].store[&o.public_id].counters, o.counters, "the local write survived");
    assert!(!sim.sites[&B].store.contains_key(&o.public_id), "B never heard of it");
    sim.run();
    assert_eq!(sim.outcome(lost), Outcome::NoAnswer);
    assert_eq!(sim.outcome(replay_b), Outcome::Quorum(Verdict::Replayed));
    assert_eq!(sim.outcome(replay_a), Outcome::Local(LocalVerdict::ReplayedOtp));
    assert!(accepted(&sim.outcome(next)));
    sim.check().unwrap();

    // 2. The origin crashes after sending, while the peer stores: the peer
    //    keeps the counters, the reply finds nobody; both sites refuse the
    //    OTP afterwards.
    let mut sim = Sim::new(Topology::TwoSites, 8, faults.clone(), |_| {});
    let o = otp(1, 11, 0);
    let lost = sim.submit(ms(0), A, &o, "crash-nonce-0101");
    sim.crash(ms(3), A);
    sim.restart(ms(50), A);
    let replay_a = sim.submit(ms(100), A, &o, "crash-nonce-0102");
    let replay_b = sim.submit(ms(150), B, &o, "crash-nonce-0103");
    sim.run();
    assert_eq!(sim.outcome(lost), Outcome::NoAnswer);
    assert_eq!(sim.sites[&B].store[&o.public_id].counters, o.counters);
    assert_eq!(sim.outcome(replay_a), Outcome::Local(LocalVerdict::ReplayedOtp));
    assert_eq!(sim.outcome(replay_b), Outcome::Local(LocalVerdict::ReplayedOtp));
    sim.check().unwrap();

    // 3. The peer crashes after its durable write, before replying: the
    //    origin fails closed at its deadline; after B restarts, the OTP is
    //    refused everywhere and the next one is accepted.
    let mut sim = Sim::new(Topology::TwoSites, 9, faults.clone(), |_| {});
    let o = otp(1, 12, 0);
    let failed = sim.submit(ms(0), A, &o, "crash-nonce-0201");
    // LocalCas at 1, LocalAccepted at 1..2, request at B by 4, written by 5,
    // reply leaves by 6.
    sim.crash(ms(5), B);
    sim.restart(ms(30), B);
    let replay_b = sim.submit(ms(100), B, &o, "crash-nonce-0202");
    let next = sim.submit(ms(200), B, &otp(1, 12, 1), "crash-nonce-0203");
    sim.run();
    assert_eq!(sim.outcome(failed), Outcome::Quorum(Verdict::NotEnoughAnswers { sl: 50 }));
    assert_eq!(sim.outcome(replay_b), Outcome::Local(LocalVerdict::ReplayedOtp));
    assert!(accepted(&sim.outcome(next)));
    sim.check().unwrap();

    // 4. The same request fanned out, the origin's crash in the middle: the
    //    same request at the other site may still succeed (it was never
    //    answered OK); the next OTP is accepted as usual.
    let mut sim = Sim::new(Topology::TwoSites, 10, faults, |_| {});
    let o = otp(1, 13, 0);
    sim.submit(ms(0), A, &o, "crash-nonce-0301");
    sim.crash(ms(1), A);
    sim.restart(ms(20), A);
    let same = sim.submit(ms(40), B, &o, "crash-nonce-0301");
    let next = sim.submit(ms(100), A, &otp(1, 13, 1), "crash-nonce-0302");
    sim.run();
    assert_eq!(sim.outcome(same), Outcome::Quorum(Verdict::Accepted { sl: 100 }));
    assert!(accepted(&sim.outcome(next)));
    sim.check().unwrap();
}

#[test]
fn reordered_and_duplicated_messages_are_harmless() {
    for topology in [Topology::TwoSites, Topology::Witness] {
        // Every message twice, latencies from 1 to 20 ms, resends every
        // 5 ms: replies overtake requests, duplicates arrive after decisions.
        let faults = Faults { latency: (ms(1), ms(20)), duplicate: 1.0, ..Faults::none() };
        let mut sim = Sim::new(topology, 11, faults, |c| c.resend_every = Some(ms(5)));
        let mut subs = Vec::new();
        for i in 0..20u8 {
            let site = if i % 2 == 0 { A } else { B };
            subs.push(sim.submit(ms(60 * u64::from(i)), site, &otp(1, 1, i), &format!("dup-nonce-{i:06}")));
        }
        sim.run();
        for s in &subs {
            assert!(accepted(&sim.outcome(*s)), "{topology:?}: {:?}", sim.outcome(*s));
        }
        sim.check().unwrap();
        // Every peer compare-and-set ran once per request, not per copy.
        let peers = if topology == Topology::TwoSites { 1 } else { 2 };
        let writes: usize = sim.sites.values().map(|s| s.store.len()).sum();
        assert_eq!(writes, peers + 1);
    }
}

#[test]
fn accept_at_risk_only_inside_its_window() {
    let mut sim = no_faults(Topology::TwoSites);
    let until = sim.at(ms(500));
    sim.reconfigure(|c| c.policy = Policy::AcceptAtRisk { until });
    sim.cut(ms(0), A, B);
    let inside = sim.submit(ms(10), A, &otp(1, 1, 0), "risk-nonce-00001");
    // The deadline of this one falls after the window: fail closed.
    let straddling = sim.submit(ms(470), A, &otp(1, 1, 1), "risk-nonce-00002");
    let after = sim.submit(ms(600), B, &otp(1, 1, 2), "risk-nonce-00003");
    sim.heal(ms(700), A, B);
    // A stale answer is a replay even inside the window.
    sim.cut(ms(800), A, B);
    sim.heal(ms(801), A, B);
    sim.run();
    assert_eq!(sim.outcome(inside), Outcome::Quorum(Verdict::AcceptedAtRisk { sl: 50 }));
    assert_eq!(sim.outcome(straddling), Outcome::Quorum(Verdict::NotEnoughAnswers { sl: 50 }));
    assert_eq!(sim.outcome(after), Outcome::Quorum(Verdict::NotEnoughAnswers { sl: 50 }));
    let at_risk: Vec<_> = sim.events.iter().filter(|(_, e)| matches!(e, Event::AcceptedAtRisk { .. })).collect();
    assert_eq!(at_risk.len(), 1);
    assert!(matches!(at_risk[0], (A, Event::AcceptedAtRisk { acks: 1, required: 2, .. })));
    assert_eq!(sim.count_events(|e| matches!(e, Event::QuorumFailed { .. })), 2);
}

#[test]
fn at_risk_window_never_overrides_a_replay() {
    let mut sim = no_faults(Topology::TwoSites);
    let until = sim.at(Duration::from_secs(10));
    sim.reconfigure(|c| c.policy = Policy::AcceptAtRisk { until });
    let o = otp(1, 1, 0);
    let first = sim.submit(ms(0), A, &o, "window-nonce-001");
    sim.run();
    assert_eq!(sim.outcome(first), Outcome::Quorum(Verdict::Accepted { sl: 100 }));
    // B lost its copy of the counters (say, restored from an old backup):
    // A still refuses.
    sim.sites.get_mut(&B).unwrap().store.clear();
    let replay = sim.submit(ms(100), B, &o, "window-nonce-002");
    sim.run();
    assert_eq!(sim.outcome(replay), Outcome::Quorum(Verdict::Replayed));
    assert_eq!(sim.count_events(|e| matches!(e, Event::AcceptedAtRisk { .. })), 0);
}

#[test]
fn sync_level_and_timeout_within_the_rule() {
    let mut sim = no_faults(Topology::Witness);
    sim.crash(ms(0), W);
    // sl=100 asks for every node: with W down, not enough.
    let all = sim.submit_full(ms(10), A, &otp(1, 1, 0), "sl-nonce-0000001", Some(100), None);
    // sl=60 (yubikey-val's default) is the majority; sl=1 cannot go below it.
    let default = sim.submit_full(ms(100), A, &otp(1, 1, 1), "sl-nonce-0000002", Some(60), None);
    let fast = sim.submit_full(ms(200), B, &otp(1, 1, 2), "sl-nonce-0000003", Some(1), None);
    // A shorter timeout shortens the deadline; a longer one does not extend it.
    sim.cut(ms(300), A, B);
    let short = sim.submit_full(ms(310), A, &otp(1, 1, 3), "sl-nonce-0000004", None, Some(ms(10)));
    let long = sim.submit_full(ms(400), A, &otp(1, 1, 4), "sl-nonce-0000005", None, Some(Duration::from_secs(60)));
    sim.run();
    assert_eq!(sim.outcome(all), Outcome::Quorum(Verdict::NotEnoughAnswers { sl: 66 }));
    assert_eq!(sim.outcome(default), Outcome::Quorum(Verdict::Accepted { sl: 66 }));
    assert_eq!(sim.outcome(fast), Outcome::Quorum(Verdict::Accepted { sl: 66 }));
    assert_eq!(sim.outcome(short), Outcome::Quorum(Verdict::NotEnoughAnswers { sl: 33 }));
    let a = &sim.answers[&short];
    assert_eq!(a.answered_at, a.fed_at.unwrap() + ms(10));
    let a = &sim.answers[&long];
    assert_eq!(a.answered_at, a.fed_at.unwrap() + DEADLINE);

    // The arithmetic: ⌈group × sl / 100⌉, floored at `required`.
    let m = Machine::new(A, QuorumConfig::with_witness(B, W, DEADLINE)).unwrap();
    let got: Vec<usize> = [None, Some(0), Some(1), Some(40), Some(60), Some(67), Some(68), Some(100), Some(255)]
        .into_iter()
        .map(|sl| m.required_for(sl))
        .collect();
    assert_eq!(got, [2, 2, 2, 2, 2, 3, 3, 3, 3]);
    let m = Machine::new(A, QuorumConfig::two_sites(B, DEADLINE)).unwrap();
    assert_eq!([None, Some(0), Some(1), Some(100)].map(|sl| m.required_for(sl)), [2, 2, 2, 2]);
}

// ---------------------------------------------------------------------------
// The machine alone: configuration, idempotency, late answers.

fn proposal(o: &Otp, nonce: &str) -> Proposal {
    Proposal { public_id: o.public_id, counters: o.counters, nonce: nonce.to_owned(), otp_digest: o.digest }
}

#[test]
fn configurations_that_break_the_rule_are_refused() {
    let mut c = QuorumConfig::two_sites(B, DEADLINE);
    c.required = 1;
    assert_eq!(Machine::new(A, c.clone()).err(), Some(ConfigError::NotAMajority { required: 1, group: 2 }));
    c.required = 3;
    assert!(Machine::new(A, c).is_err());
    let mut c = QuorumConfig::with_witness(B, W, DEADLINE);
    c.required = 1;
    assert_eq!(Machine::new(A, c.clone()).err(), Some(ConfigError::NotAMajority { required: 1, group: 3 }));
    c.required = 3;
    assert!(Machine::new(A, c).is_ok(), "write-all with a witness is allowed");
    assert_eq!(Machine::new(B, QuorumConfig::two_sites(B, DEADLINE)).err(), Some(ConfigError::DuplicateSite(B)));
    assert!(Machine::new(A, QuorumConfig::with_witness(B, B, DEADLINE)).is_err());
    assert!(Machine::new(A, QuorumConfig::two_sites(B, Duration::ZERO)).is_err());
    let mut c = QuorumConfig::two_sites(B, DEADLINE);
    c.resend_every = Some(Duration::ZERO);
    assert_eq!(Machine::new(A, c).err(), Some(ConfigError::ResendInterval));
    // One node alone: its own compare-and-set is the quorum.
    let mut alone =
        Machine::new(A, QuorumConfig { peers: vec![], witness: None, required: 1, ..QuorumConfig::two_sites(B, DEADLINE) }).unwrap();
    let now = Instant::now();
    let out = alone.handle(
        now,
        Input::LocalAccepted { req_id: RequestId(1), proposal: proposal(&otp(1, 1, 1), "n"), sync_level: Some(100), timeout: None },
    );
    assert_eq!(out, [Action::Answer { req_id: RequestId(1), verdict: Verdict::Accepted { sl: 100 } }]);
    assert!(!ConfigError::NotAMajority { required: 1, group: 2 }.to_string().is_empty());
}

#[test]
fn peer_cas_rule() {
    let o = otp(1, 5, 5);
    let p = proposal(&o, "nonce-1");
    assert_eq!(peer_cas(None, &p), CasDecision::Store);
    let lower = StoredCounters::from(&proposal(&otp(1, 5, 4), "nonce-0"));
    assert_eq!(peer_cas(Some(&lower), &p), CasDecision::Store);
    let same = StoredCounters::from(&p);
    assert_eq!(peer_cas(Some(&same), &p), CasDecision::SameRequest);
    let other_nonce = StoredCounters { nonce: "nonce-2".into(), ..same.clone() };
    assert_eq!(peer_cas(Some(&other_nonce), &p), CasDecision::Stale { stored: o.counters });
    let other_otp = StoredCounters { otp_digest: otp_variant(1, 5, 5, 9).digest, ..same };
    assert_eq!(peer_cas(Some(&other_otp), &p), CasDecision::Stale { stored: o.counters });
    let higher = StoredCounters::from(&proposal(&otp(1, 6, 0), "nonce-1"));
    assert_eq!(peer_cas(Some(&higher), &p), CasDecision::Stale { stored: higher.counters });
}

#[test]
fn duplicates_late_replies_and_strangers_are_ignored() {
    let t = Instant::now();
    let o = otp(1, 2, 3);
    let p = proposal(&o, "nonce-x");
    let req = Message::CasRequest { req_id: RequestId(7), origin: A, proposal: p.clone() };

    // The peer side: one durable write per (origin, request id).
    let mut b = Machine::new(B, QuorumConfig::two_sites(A, DEADLINE)).unwrap();
    let out = b.handle(t, Input::Message { from: A, message: req.clone() });
    assert_eq!(out, [Action::DurableCas { origin: A, req_id: RequestId(7), proposal: p.clone() }]);
    assert!(b.handle(t, Input::Message { from: A, message: req.clone() }).is_empty());
    let out = b.handle(t + ms(1), Input::PeerCasDone { origin: A, req_id: RequestId(7), result: PeerCasResult::Stored });
    let ack = Message::CasReply { req_id: RequestId(7), public_id: o.public_id, counters: o.counters, outcome: ReplyOutcome::Ack };
    assert_eq!(out, [Action::Send { to: A, message: ack.clone() }]);
    // A duplicate after the write: answered from the cache, not written again.
    assert_eq!(b.handle(t + ms(2), Input::Message { from: A, message: req.clone() }), [Action::Send { to: A, message: ack.clone() }]);
    // A stranger, or a request claiming another origin.
    let out = b.handle(t + ms(3), Input::Message { from: W, message: req.clone() });
    assert_eq!(out, [Action::Event(Event::Ignored { from: W, reason: IgnoredReason::UnknownSite })]);
    let forged = Message::CasRequest { req_id: RequestId(8), origin: W, proposal: p.clone() };
    let out = b.handle(t + ms(3), Input::Message { from: A, message: forged });
    assert_eq!(out, [Action::Event(Event::Ignored { from: A, reason: IgnoredReason::OriginMismatch })]);
    let out = b.handle(t + ms(3), Input::PeerCasDone { origin: A, req_id: RequestId(99), result: PeerCasResult::Stored });
    assert_eq!(out, [Action::Event(Event::Ignored { from: A, reason: IgnoredReason::UnexpectedCasResult })]);
    // Long after, the cache is gone; the value rule still answers (same request).
    let out = b.handle(t + Duration::from_secs(10), Input::Message { from: A, message: req });
    assert!(matches!(out[..], [Action::DurableCas { .. }]));

    // The origin side.
    let mut a = Machine::new(A, QuorumConfig::two_sites(B, DEADLINE)).unwrap();
    let out = a.handle(t, Input::LocalAccepted { req_id: RequestId(7), proposal: p.clone(), sync_level: None, timeout: None });
    assert_eq!(
        out,
        [
            Action::Send { to: B, message: Message::CasRequest { req_id: RequestId(7), origin: A, proposal: p.clone() } },
            Action::SetTimer { at: t + DEADLINE },
        ]
    );
    assert_eq!(a.next_wakeup(), Some(t + DEADLINE));
    // A reply that does not echo the request is not counted.
    let wrong =
        Message::CasReply { req_id: RequestId(7), public_id: o.public_id, counters: otp(1, 2, 4).counters, outcome: ReplyOutcome::Ack };
    let out = a.handle(t + ms(1), Input::Message { from: B, message: wrong });
    assert_eq!(out, [Action::Event(Event::Ignored { from: B, reason: IgnoredReason::ReplyMismatch })]);
    // A failure report is not an acknowledgement; the real one then is.
    let failed = Message::CasReply { req_id: RequestId(7), public_id: o.public_id, counters: o.counters, outcome: ReplyOutcome::Failed };
    let out = a.handle(t + ms(2), Input::Message { from: B, message: failed });
    assert_eq!(out, [Action::Event(Event::PeerReportedFailure { req_id: RequestId(7), from: B })]);
    assert_eq!(a.pending(), 1);
    let out = a.handle(t + ms(3), Input::Message { from: B, message: ack.clone() });
    assert_eq!(out, [Action::Answer { req_id: RequestId(7), verdict: Verdict::Accepted { sl: 100 } }]);
    // Duplicated and late replies after the decision: nothing.
    assert!(a.handle(t + ms(4), Input::Message { from: B, message: ack.clone() }).is_empty());
    let stale = Message::CasReply {
        req_id: RequestId(7),
        public_id: o.public_id,
        counters: o.counters,
        outcome: ReplyOutcome::Stale { stored: o.counters },
    };
    assert!(a.handle(t + ms(5), Input::Message { from: B, message: stale }).is_empty());
    assert!(a.handle(t + ms(60), Input::Tick).is_empty());

    // A reply exactly at the deadline is too late.
    let mut a = Machine::new(A, QuorumConfig::two_sites(B, DEADLINE)).unwrap();
    let _ = a.handle(t, Input::LocalAccepted { req_id: RequestId(7), proposal: p, sync_level: None, timeout: None });
    let out = a.handle(t + DEADLINE, Input::Message { from: B, message: ack });
    assert_eq!(out.last(), Some(&Action::Answer { req_id: RequestId(7), verdict: Verdict::NotEnoughAnswers { sl: 50 } }));
}

#[test]
fn a_higher_value_stored_meanwhile_supersedes_a_pending_request() {
    let t = Instant::now();
    let low = otp(1, 3, 0);
    let high = otp(1, 3, 1);
    let mut a = Machine::new(A, QuorumConfig::two_sites(B, DEADLINE)).unwrap();
    let _ = a.handle(t, Input::LocalAccepted { req_id: RequestId(1), proposal: proposal(&low, "n1"), sync_level: None, timeout: None });
    // B's request for a higher value is stored at A while A's waits.
    let req = Message::CasRequest { req_id: RequestId(50), origin: B, proposal: proposal(&high, "n2") };
    let _ = a.handle(t + ms(1), Input::Message { from: B, message: req });
    let out = a.handle(t + ms(2), Input::PeerCasDone { origin: B, req_id: RequestId(50), result: PeerCasResult::Stored });
    assert!(out.contains(&Action::Answer { req_id: RequestId(1), verdict: Verdict::Replayed }), "{out:?}");
    assert!(out.iter().any(|x| matches!(x, Action::Event(Event::Superseded { req_id: RequestId(1), .. }))));
    // A local request that arrives after a higher one was stored here.
    let out =
        a.handle(t + ms(3), Input::LocalAccepted { req_id: RequestId(2), proposal: proposal(&low, "n3"), sync_level: None, timeout: None });
    assert!(out.contains(&Action::Answer { req_id: RequestId(2), verdict: Verdict::Replayed }), "{out:?}");
}

// ---------------------------------------------------------------------------
// The invariant over random schedules.

/// One random schedule: a topology, faults, a few dozen OTPs of a few keys
/// submitted with random fan-out, nonce reuse, replays, forged equal
/// counters, partitions and crashes.
fn random_schedule(seed: u64) -> Sim {
    let mut rng = Rng(seed ^ 0x5eed_0fc0_ffee);
    let topology = if rng.chance(0.5) { Topology::TwoSites } else { Topology::Witness };
    let faults = Faults {
        latency: rng.pick(&[(ms(1), ms(3)), (ms(1), ms(15)), (ms(5), ms(40))]),
        fsync: rng.pick(&[(ms(0), ms(1)), (ms(1), ms(4))]),
        drop: rng.pick(&[0.0, 0.0, 0.05, 0.3]),
        duplicate: rng.pick(&[0.0, 0.1, 0.5]),
        write_survives_crash: 0.5,
    };
    let resend = rng.pick(&[None, Some(ms(7)), Some(ms(20))]);
    let mut sim = Sim::new(topology, rng.next(), faults, |c| c.resend_every = resend);
    let sites: Vec<SiteId> = if topology == Topology::TwoSites { vec![A, B] } else { vec![A, B, W] };
    let front = [A, B];
    let horizon = 600u64;

    // Faults in time.
    for _ in 0..rng.below(3) {
        let x = rng.pick(&sites);
        let mut y = rng.pick(&sites);
        while y == x {
            y = rng.pick(&sites);
        }
        let start = rng.below(horizon);
        sim.cut(ms(start), x, y);
        sim.heal(ms(start + rng.below(200)), x, y);
    }
    for _ in 0..rng.below(3) {
        let site = rng.pick(&sites);
        let start = rng.below(horizon);
        sim.crash(ms(start), site);
        sim.restart(ms(start + rng.below(100)), site);
    }

    // OTPs: per key, counters increase with the index; times are jittered,
    // so lower OTPs sometimes arrive after higher ones.
    let keys = 1 + rng.below(3);
    let nonce_pool = rng.pick(&[3u64, 50, 1_000_000]);
    let mut issued: Vec<Otp> = Vec::new();
    let mut next_counters: BTreeMap<u64, (u16, u8)> = BTreeMap::new();
    let otps = 20 + rng.below(20);
    for i in 0..otps {
        let k = 1 + rng.below(keys);
        let (c, u) = next_counters.get(&k).copied().unwrap_or((1, 0));
        let o = otp(k, c, u);
        next_counters.insert(k, if rng.chance(0.2) { (c + 1, 0) } else { (c, u.wrapping_add(1)) });
        let t = ms(i * horizon / otps) + rng.between(Duration::ZERO, ms(25));
        let nonce = format!("nonce{:012}", rng.below(nonce_pool));
        match rng.below(10) {
            // pam_yubico: the same request to both sites.
            0..=3 => {
                for site in front {
                    let jitter = rng.between(Duration::ZERO, ms(4));
                    sim.submit_random(t + jitter, site, &o, &nonce);
                }
            }
            // One site.
            4..=6 => {
                sim.submit_random(t, rng.pick(&front), &o, &nonce);
            }
            // Two clients racing with the same OTP, different nonces.
            7 => {
                let other = format!("nonce{:012}", rng.below(nonce_pool));
                sim.submit_random(t, rng.pick(&front), &o, &nonce);
                sim.submit_random(t + rng.between(Duration::ZERO, ms(10)), rng.pick(&front), &o, &other);
            }
            // The same counters in another OTP string, same nonce.
            8 => {
                sim.submit_random(t, A, &o, &nonce);
                let forged = otp_variant(k, c, u, 1 + rng.below(3) as u8);
                sim.submit_random(t + rng.between(Duration::ZERO, ms(5)), B, &forged, &nonce);
            }
            // The same request twice at one site, and to the other later.
            _ => {
                let site = rng.pick(&front);
                sim.submit_random(t, site, &o, &nonce);
                sim.submit_random(t + rng.between(Duration::ZERO, ms(30)), site, &o, &nonce);
                sim.submit_random(t + rng.between(ms(20), ms(80)), rng.pick(&front), &o, &nonce);
            }
        }
        // A replay of an older OTP, with a fresh or the original nonce.
        if !issued.is_empty() && rng.chance(0.2) {
            let old = issued[rng.below(issued.len() as u64) as usize].clone();
            let replay_nonce = format!("nonce{:012}", rng.below(nonce_pool));
            sim.submit_random(t + rng.between(Duration::ZERO, ms(100)), rng.pick(&front), &old, &replay_nonce);
        }
        issued.push(o);
    }
    sim.run();
    sim
}

#[test]
fn random_schedules_never_accept_twice_nor_out_of_order() {
    let schedules: u64 = std::env::var("QUORUM_SCHEDULES").ok().and_then(|v| v.parse().ok()).unwrap_or(5_000);
    let only: Option<u64> = std::env::var("QUORUM_SEED").ok().and_then(|v| v.parse().ok());
    let seeds: Vec<u64> = only.map_or_else(|| (0..schedules).map(|i| 0x9000_0000 + i).collect(), |s| vec![s]);
    let started = Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let totals = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let seeds = &seeds;
                scope.spawn(move || {
                    let mut totals = [0usize; 6];
                    for seed in seeds.iter().skip(t).step_by(threads) {
                        let result = std::panic::catch_unwind(|| random_schedule(*seed));
                        let sim = match result {
                            Ok(sim) => sim,
                            Err(_) => panic!("schedule panicked; replay with QUORUM_SEED={seed}"),
                        };
                        if let Err(violation) = sim.check() {
                            panic!("invariant violated; replay with QUORUM_SEED={seed}: {violation}");
                        }
                        totals[0] += sim.subs.len();
                        for a in sim.answers.values() {
                            match a.outcome {
                                Outcome::Quorum(Verdict::Accepted { .. }) => totals[1] += 1,
                                Outcome::Quorum(Verdict::Replayed) | Outcome::Local(_) => totals[2] += 1,
                                Outcome::Quorum(Verdict::NotEnoughAnswers { .. }) => totals[3] += 1,
                                Outcome::Quorum(Verdict::AcceptedAtRisk { .. }) => totals[4] += 1,
                                Outcome::NoAnswer => {}
                            }
                        }
                        totals[5] += sim.subs.len() - sim.answers.len();
                    }
                    totals
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).fold([0usize; 6], |mut acc, t| {
            for (a, b) in acc.iter_mut().zip(t) {
                *a += b;
            }
            acc
        })
    });
    eprintln!(
        "{} schedules, {} submissions: {} accepted, {} replayed, {} not enough answers, {} unanswered (crash); {:?}",
        seeds.len(),
        totals[0],
        totals[1],
        totals[2],
        totals[3],
        totals[5],
        started.elapsed()
    );
    assert_eq!(totals[4], 0);
    // The schedules exercise every outcome.
    if only.is_none() && schedules >= 100 {
        assert!(totals[1] > totals[0] / 5, "too few acceptances to mean anything: {totals:?}");
        assert!(totals[2] > 0 && totals[3] > 0 && totals[5] > 0, "{totals:?}");
    }
}
