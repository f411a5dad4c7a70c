//! gridproxy against real `pool_sv2` instances: honest reject reasons, a
//! pinned authority key, failover / fail-back without miner reconnects, and
//! after a new block `clean_jobs` to every SV1 miner and old-tip shares stale.

use gridproxy::config::Config;
use gridproxy_fixtures::tp::TpConfig;
use gridproxy_protocol::difficulty::Target;
use gridproxy_protocol::share::{Job, Work};
use gridproxy_protocol::sv1::{self, ServerMessage};
use gridproxy_proxy::stats::RejectReason;
use gridproxy_tests::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn config(pools: &[(&str, SocketAddr, String, u32)], extra: &str) -> Config {
    let mut s = String::new();
    for (name, addr, key, prio) in pools {
        s.push_str(&format!(
            "[[pools]]\nname = \"{name}\"\naddress = \"{addr}\"\nprotocol = \"sv2\"\nauthority_pubkey = \"{key}\"\nuser = \"gridproxy-test\"\npriority = {prio}\nnominal_hashrate = 250000.0\n\n"
        ));
    }
    s.push_str("[listen]\nsv1 = \"127.0.0.1:0\"\n\n[difficulty]\ninitial = 0.000003814697265625\nmin = 0.000000001\nshares_per_minute = 20.0\n\n");
    s.push_str(extra);
    Config::parse(&s, "test").expect("valid test config")
}

/// A hand-driven SV1 client for exact conversations.
struct RawMiner {
    rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
    en1: Vec<u8>,
    en2_size: usize,
    difficulty: f64,
    /// Jobs in arrival order: id, work, `clean_jobs`.
    jobs: Vec<(String, Job, bool)>,
    user: String,
}

impl RawMiner {
    async fn connect(addr: SocketAddr, user: &str) -> Self {
        let s = TcpStream::connect(addr).await.unwrap();
        let (rd, wr) = s.into_split();
        let mut m = RawMiner {
            rd: BufReader::new(rd),
            wr,
            en1: vec![],
            en2_size: 0,
            difficulty: 0.0,
            jobs: vec![],
            user: user.to_string(),
        };
        m.send(json!({"id": 1, "method": "mining.subscribe", "params": ["raw/1"]}))
            .await;
        let r = m.response().await;
        let (en1, size) = sv1::parse_subscribe_result(&r.0).unwrap();
        (m.en1, m.en2_size) = (en1, size);
        m.send(json!({"id": 2, "method": "mining.authorize", "params": [user, "x"]}))
            .await;
        assert_eq!(m.response().await.0, Value::Bool(true));
        m
    }

    async fn send(&mut self, v: Value) {
        self.wr
            .write_all(format!("{v}\n").as_bytes())
            .await
            .unwrap();
    }

    /// Read until a response arrives; notifications update state on the way.
    async fn response(&mut self) -> (Value, Option<sv1::RpcError>) {
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(30), self.rd.read_line(&mut line))
                .await
                .expect("proxy answers")
                .unwrap();
            assert!(n > 0, "proxy closed the connection");
            match sv1::parse_server(line.trim_end().as_bytes()).unwrap() {
                ServerMessage::Response { result, error, .. } => return (result, error),
                ServerMessage::SetDifficulty(d) => self.difficulty = d,
                ServerMessage::Notify(n) => {
                    self.jobs.push((n.job_id.clone(), n.to_job(), n.clean_jobs))
                }
                _ => {}
            }
        }
    }

    /// Read notifications until `n` jobs are known.
    async fn wait_jobs(&mut self, n: usize) {
        while self.jobs.len() < n {
            let mut line = String::new();
            tokio::time::timeout(Duration::from_secs(30), self.rd.read_line(&mut line))
                .await
                .expect("a job arrives")
                .unwrap();
            match sv1::parse_server(line.trim_end().as_bytes()).unwrap() {
                ServerMessage::SetDifficulty(d) => self.difficulty = d,
                ServerMessage::Notify(n) => {
                    self.jobs.push((n.job_id.clone(), n.to_job(), n.clean_jobs))
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Read notifications until a job on a tip other than `prev_hash`
    /// arrives; its index.
    async fn wait_new_tip(&mut self, prev_hash: [u8; 32]) -> usize {
        loop {
            if let Some(i) = self.jobs.iter().position(|j| j.1.prev_hash != prev_hash) {
                return i;
            }
            let n = self.jobs.len();
            self.wait_jobs(n + 1).await;
        }
    }

    /// First nonce on job `idx` whose hash meets `meets` and fails `fails` (if given).
    fn find(&self, idx: usize, en2: &[u8], meets: Option<Target>, fails: Option<Target>) -> u32 {
        let job = &self.jobs[idx].1;
        let mut en = self.en1.clone();
        en.extend_from_slice(en2);
        // The merkle root once; only the nonce changes.
        let mut header = job
            .header(
                &Work {
                    extranonce: &en,
                    ntime: job.ntime,
                    nonce: 0,
                    version_bits: None,
                },
                0,
            )
            .unwrap();
        for nonce in 0..u32::MAX {
            header[76..80].copy_from_slice(&nonce.to_le_bytes());
            let h = gridproxy_protocol::share::sha256d(&header);
            if meets.is_none_or(|t| t.is_met_by(&h)) && fails.is_none_or(|t| !t.is_met_by(&h)) {
                return nonce;
            }
        }
        unreachable!()
    }

    async fn submit(
        &mut self,
        job_id: &str,
        en2: &[u8],
        ntime: u32,
        nonce: u32,
    ) -> Result<(), (i64, String)> {
        let p = json!([
            self.user,
            job_id,
            hex::encode(en2),
            format!("{ntime:08x}"),
            format!("{nonce:08x}")
        ]);
        self.send(json!({"id": 4, "method": "mining.submit", "params": p}))
            .await;
        match self.response().await {
            (Value::Bool(true), None) => Ok(()),
            (_, Some(e)) => Err((e.code, e.message)),
            (r, None) => panic!("odd answer {r}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_share_gets_its_own_reject_reason() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let tp = start_tp_with(TpConfig {
        new_tip_on_solution: false,
        template_interval: Duration::from_secs(3600),
        ..Default::default()
    })
    .await;
    let pool = start_pool(tp.addr()).await;
    let proxy = gridproxy_tests::start_proxy(config(
        &[("sri", pool.addr, pool.authority_pubkey.to_string(), 0)],
        "",
    ))
    .await
    .unwrap();
    let mut m = RawMiner::connect(proxy.sv1_addr.unwrap(), "raw.1").await;
    m.wait_jobs(1).await;
    let (job_a, ntime) = (m.jobs[0].0.clone(), m.jobs[0].1.ntime);
    let d0 = Target::from_difficulty(m.difficulty);
    let en2 = vec![0, 0, 0, 1];

    let good = m.find(0, &en2, Some(d0), None);
    assert_eq!(
        m.submit(&job_a, &en2, ntime, good).await,
        Ok(()),
        "a valid share is accepted"
    );
    assert_eq!(
        m.submit(&job_a, &en2, ntime, good).await,
        Err((22, "Duplicate share".into()))
    );
    assert_eq!(
        m.submit("abcdef", &en2, ntime, good).await,
        Err((21, "Stale job".into()))
    );
    let bad = m.find(0, &en2, None, Some(d0));
    assert_eq!(
        m.submit(&job_a, &en2, ntime, bad).await,
        Err((20, "Invalid share: bad nonce".into()))
    );
    assert_eq!(
        m.submit(&job_a, &[0, 1], ntime, good).await,
        Err((20, "Invalid share".into())),
        "wrong extranonce2 size"
    );

    // Raise the difficulty: the next job is judged at d1; a share meeting only d0 is low difficulty.
    m.send(
        json!({"id": 5, "method": "mining.suggest_difficulty", "params": [m.difficulty * 1024.0]}),
    )
    .await;
    assert_eq!(m.response().await.0, Value::Bool(true));
    m.wait_jobs(2).await;
    let d1 = Target::from_difficulty(m.difficulty);
    assert!(d1 < d0);
    let job_b = m.jobs[1].0.clone();
    let low = m.find(1, &en2, Some(d0), Some(d1));
    assert_eq!(
        m.submit(&job_b, &en2, ntime, low).await,
        Err((23, "Low difficulty share".into()))
    );

    let w = proxy.ctx.registry.get("raw.1").unwrap();
    assert_eq!(w.accepted.get(), 1);
    for (r, n) in [
        (RejectReason::Duplicate, 1),
        (RejectReason::StaleJob, 1),
        (RejectReason::BadNonce, 1),
        (RejectReason::Invalid, 1),
        (RejectReason::LowDifficulty, 1),
        (RejectReason::Unauthorized, 0),
    ] {
        assert_eq!(w.rejected(r), n, "{r:?}");
    }
    proxy.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_pool_authority_key_is_refused() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    gridproxy_tests::init_tracing();
    let tp = start_tp().await;
    let pool = start_pool(tp.addr()).await;
    let wrong = gridproxy_protocol::sv2::AuthorityKeypair::from_secret_bytes([7u8; 32])
        .unwrap()
        .public()
        .to_string();
    assert_ne!(wrong, pool.authority_pubkey.to_string());
    let proxy = gridproxy_tests::start_proxy(config(&[("sri", pool.addr, wrong.clone(), 0)], ""))
        .await
        .unwrap();
    let stats = proxy.ctx.router.pools()[0].stats.clone();
    assert!(wait_until(Duration::from_secs(10), || stats.last_error().is_some()).await);
    let err = stats.last_error().unwrap();
    assert!(
        err.contains("not signed by the pinned authority_pubkey") && err.contains(&wrong),
        "{err}"
    );
    assert!(!proxy.ctx.router.pools()[0].view.borrow().live);
    assert_eq!(stats.connects.get(), 0, "no channel was opened");
    proxy.stop.cancel();
}

/// After a new block every SV1 miner is told `clean_jobs = true` on the
/// first job of the new tip, and a share on a job of the old tip is
/// refused as stale by gridproxy (never forwarded), while the shares it
/// does forward (each meeting the pool's target, before and after the
/// block) are all accepted by pool_sv2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_block_cleans_every_sv1_miner_and_old_tip_shares_are_stale() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let tp = start_tp_with(TpConfig {
        nbits: gridproxy_fixtures::tp::QUIET_NBITS,
        new_tip_on_solution: false,
        template_interval: Duration::from_secs(3600),
        ..Default::default()
    })
    .await;
    let pool = start_pool(tp.addr()).await;
    let proxy = gridproxy_tests::start_proxy(config(
        &[("sri", pool.addr, pool.authority_pubkey.to_string(), 0)],
        "",
    ))
    .await
    .unwrap();
    let up = proxy.ctx.router.pools()[0].clone();
    assert!(wait_until(Duration::from_secs(30), || up.view.borrow().live).await);
    let n = 10;
    let mut miners = Vec::new();
    for i in 0..n {
        let mut m = RawMiner::connect(proxy.sv1_addr.unwrap(), &format!("stale.{i}")).await;
        m.wait_jobs(1).await;
        miners.push(m);
    }
    // As the pool judges it: the job's own target (pool_sv2 keeps one per job).
    let up_target = {
        let v = up.view.borrow();
        v.job.as_ref().and_then(|j| j.target).unwrap_or(v.target)
    };
    let en2 = |m: &RawMiner, last: u8| {
        let mut e = vec![0u8; m.en2_size];
        *e.last_mut().unwrap() = last;
        e
    };
    // On the old tip: one share each that gridproxy forwards (the pool
    // accepts it), and one kept for after the block.
    let mut old = Vec::new();
    for m in miners.iter_mut() {
        let i = m.jobs.len() - 1;
        let target = Target::from_difficulty(m.difficulty).min(up_target);
        let (id, ntime, prev) = (
            m.jobs[i].0.clone(),
            m.jobs[i].1.ntime,
            m.jobs[i].1.prev_hash,
        );
        let (e1, e2) = (en2(m, 1), en2(m, 2));
        let nonce = m.find(i, &e1, Some(target), None);
        assert_eq!(m.submit(&id, &e1, ntime, nonce).await, Ok(()));
        let kept = m.find(i, &e2, Some(target), None);
        old.push((id, e2, ntime, kept, prev));
    }
    assert!(
        pool.wait_shares_accepted(n as f64, Duration::from_secs(20))
            .await,
        "pool accepted {} of the {n} forwarded shares",
        pool.shares_accepted().await
    );

    tp.new_block();
    let mut not_clean = Vec::new();
    for (i, (m, (id, e2, ntime, nonce, prev))) in miners.iter_mut().zip(&old).enumerate() {
        let j = m.wait_new_tip(*prev).await;
        if !m.jobs[j].2 {
            not_clean.push(i);
        }
        // The old tip's work, meeting the pool's target: stale.
        assert_eq!(
            m.submit(id, e2, *ntime, *nonce).await,
            Err((21, "Stale job".into())),
            "miner {i}: a share of the old tip"
        );
        // The new tip's work is forwarded and accepted.
        let target = Target::from_difficulty(m.difficulty).min(up_target);
        let last = m.jobs.len() - 1;
        let (nid, nt) = (m.jobs[last].0.clone(), m.jobs[last].1.ntime);
        let e3 = en2(m, 3);
        let nonce = m.find(last, &e3, Some(target), None);
        assert_eq!(m.submit(&nid, &e3, nt, nonce).await, Ok(()), "miner {i}");
    }
    assert!(
        not_clean.is_empty(),
        "miners whose first job of the new tip had clean_jobs = false: {not_clean:?}"
    );
    // The block's fan-out was timed once per miner (the operators' histogram).
    let (_, timed, secs) = proxy.ctx.fanout_seconds.snapshot();
    assert_eq!(timed, n as u64, "fan-out observations for {n} miners");
    assert!(secs >= 0.0 && secs < 10.0 * n as f64, "{secs}");
    assert!(
        pool.wait_shares_accepted(2.0 * n as f64, Duration::from_secs(20))
            .await,
        "pool accepted {} of the {} forwarded shares",
        pool.shares_accepted().await,
        2 * n
    );
    let s = &up.stats;
    assert!(
        wait_until(Duration::from_secs(10), || s.accepted.get() == 2 * n as u64).await,
        "gridproxy: {} forwarded, {} acked, {} rejected",
        s.submitted.get(),
        s.accepted.get(),
        s.rejected.get()
    );
    assert_eq!(
        s.submitted.get(),
        2 * n as u64,
        "stale work never forwarded"
    );
    assert_eq!(s.rejected.get(), 0);
    assert_eq!(pool.shares_accepted().await, 2.0 * n as f64);
    assert_eq!(pool.shares_rejected().await, 0.0);
    for i in 0..n {
        let w = proxy.ctx.registry.get(&format!("stale.{i}")).unwrap();
        assert_eq!(w.rejected(RejectReason::StaleJob), 1, "stale.{i}");
        assert_eq!(w.accepted.get(), 2, "stale.{i}");
    }
    proxy.stop.cancel();
}

/// [`restart_pool`], and its SV2 port accepts connections again.
async fn restart_pool_listening(old: &Pool) -> PeerProcess {
    let p = restart_pool(old).await;
    assert!(wait_for_port(old.addr, Duration::from_secs(10)).await);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_backup_and_failback_without_reconnecting_miners() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let (tp_a, tp_b) = (start_quiet_tp().await, start_quiet_tp().await);
    let mut primary = start_pool(tp_a.addr()).await;
    let backup = start_pool(tp_b.addr()).await;
    let key = primary.authority_pubkey.to_string();
    let cfg = config(
        &[
            ("primary", primary.addr, key.clone(), 0),
            ("backup", backup.addr, key, 1),
        ],
        "[routing]\nreconnect_ms = 100\nfailback_cooldown_secs = 3\n",
    );
    let proxy = gridproxy_tests::start_proxy(cfg).await.unwrap();
    let n = 20;
    // Each miner with its own counters (to see a backup job reach every
    // one), and the sums in `stats`.
    let stop = tokio_util::sync::CancellationToken::new();
    let each: Vec<Arc<gridproxy_fixtures::stats::MinerStats>> = (0..n)
        .map(|_| Arc::new(gridproxy_fixtures::stats::MinerStats::default()))
        .collect();
    for (i, st) in each.iter().enumerate() {
        let mut cfg = gridproxy_fixtures::sv1_miner::Sv1MinerConfig::new(
            proxy.sv1_addr.unwrap(),
            format!("fo.{i}"),
        );
        cfg.hashrate = 5_000.0;
        cfg.version_rolling = i % 2 == 0;
        tokio::spawn(gridproxy_fixtures::sv1_miner::run(
            cfg,
            st.clone(),
            stop.clone(),
        ));
    }
    let stats = Totals(each.clone());
    let pools = proxy.ctx.router.pools().to_vec();
    let (a, b) = (pools[0].stats.clone(), pools[1].stats.clone());
    assert!(
        wait_until(Duration::from_secs(60), || a.accepted.get() >= 5).await,
        "primary got no shares"
    );
    assert_eq!(b.submitted.get(), 0, "backup idle while the primary is up");
    assert!(
        wait_until(Duration::from_secs(10), || stats.connects().get()
            == n as u64)
        .await
    );

    // Kill the primary: every miner must get a backup job within 1 s, on its existing connection.
    let jobs_before: Vec<u64> = each.iter().map(|m| m.jobs.get()).collect();
    let t0 = Instant::now();
    primary.process.kill();
    assert!(
        wait_until(Duration::from_secs(5), || each
            .iter()
            .zip(&jobs_before)
            .all(|(m, before)| m.jobs.get() > *before))
        .await,
        "miners without a new job after the failover: {:?}",
        each.iter()
            .zip(&jobs_before)
            .enumerate()
            .filter(|(_, (m, before))| m.jobs.get() <= **before)
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    );
    let switch = t0.elapsed();
    println!("failover: all {n} miners had a backup job {switch:?} after the primary was killed");
    assert!(switch < Duration::from_secs(1), "failover took {switch:?}");
    assert!(
        wait_until(Duration::from_secs(60), || b.accepted.get() >= 5).await,
        "backup got no shares"
    );
    assert_eq!(stats.connects().get(), n as u64, "no miner reconnected");
    assert_eq!(stats.disconnects().get(), 0);

    // Bring the primary back: after the 3 s cooldown the miners return, still without reconnecting.
    let restarted = restart_pool_listening(&primary).await;
    let a_before = a.submitted.get();
    let t1 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(60), || a.submitted.get() > a_before + 5).await,
        "no fail-back"
    );
    let back = t1.elapsed();
    println!("fail-back: shares flowed to the restarted primary {back:?} after it came up (cooldown 3 s)");
    assert!(
        back >= Duration::from_secs(2),
        "fail-back ignored the cooldown ({back:?})"
    );
    let b_sent = b.submitted.get();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        b.submitted.get() <= b_sent + 2,
        "backup still receiving shares after fail-back"
    );
    assert_eq!(stats.connects().get(), n as u64, "no miner reconnected");

    stop.cancel();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Counts stay consistent: every pool ack is credited to exactly one worker.
    let workers = proxy.ctx.registry.snapshot();
    let credited: u64 = workers.iter().map(|w| w.upstream_accepted).sum();
    assert_eq!(credited, a.accepted.get() + b.accepted.get());
    assert_eq!(
        workers.iter().map(|w| w.accepted).sum::<u64>(),
        stats.accepted().get()
    );
    // The backup's own count matches what gridproxy credited for it.
    assert!(
        backup
            .wait_shares_accepted(b.accepted.get() as f64, Duration::from_secs(5))
            .await
    );
    assert_eq!(backup.shares_accepted().await, b.accepted.get() as f64);
    drop(restarted);
    proxy.stop.cancel();
}

/// Sums over per-miner counters, read like one [`MinerStats`].
struct Totals(Vec<Arc<gridproxy_fixtures::stats::MinerStats>>);

/// One summed counter.
struct Sum(u64);

impl Sum {
    fn get(&self) -> u64 {
        self.0
    }
}

impl Totals {
    fn sum(&self, f: impl Fn(&gridproxy_fixtures::stats::MinerStats) -> u64) -> Sum {
        Sum(self.0.iter().map(|m| f(m)).sum())
    }
}

/// Sums of the counters the failover test reads.
impl Totals {
    fn connects(&self) -> Sum {
        self.sum(|m| m.connects.get())
    }
    fn disconnects(&self) -> Sum {
        self.sum(|m| m.disconnects.get())
    }
    fn accepted(&self) -> Sum {
        self.sum(|m| m.accepted.get())
    }
}
