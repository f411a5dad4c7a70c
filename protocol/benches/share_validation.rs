//! ns per validated share: what the proxy does for every SV1 submit once the
//! merkle root for the miner's extranonce is known — header assembly, sha256d,
//! target comparison — plus the full path with the coinbase/merkle branch.
//! The floor is one sha256d of 80 bytes (three SHA-256 compressions).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use gridproxy_protocol::difficulty::Target;
use gridproxy_protocol::share::{check, sha256d, HeaderJob, Job, Work};

fn job() -> Job {
    Job {
        version: 0x2000_0004,
        prev_hash: [7; 32],
        coinbase_prefix: vec![1; 50],
        coinbase_suffix: vec![2; 150],
        merkle_branch: vec![[3; 32]; 12],
        nbits: 0x170ed0eb,
        ntime: 1633002641,
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("share_validation");
    g.throughput(Throughput::Elements(1));
    let header = [5u8; 80];
    g.bench_function("sha256d_80B_floor", |b| {
        b.iter(|| sha256d(black_box(&header)))
    });

    let j = job();
    let en = [9u8; 8];
    let miner = Target::from_difficulty(1024.0);
    let upstream = Target::from_difficulty(65536.0);
    let root = gridproxy_protocol::share::merkle_root(
        &[&j.coinbase_prefix, &en, &j.coinbase_suffix],
        &j.merkle_branch,
    );
    let hj = HeaderJob {
        version: j.version,
        prev_hash: j.prev_hash,
        merkle_root: root,
        nbits: j.nbits,
    };
    let mut nonce = 0u32;
    g.bench_function("header_hash_check", |b| {
        b.iter(|| {
            nonce = nonce.wrapping_add(1);
            let h = hj.hash(0x2000_6004, 1633002641, black_box(nonce));
            check(&h, &miner, &upstream, j.nbits)
        })
    });
    g.bench_function("full_with_merkle_12", |b| {
        b.iter(|| {
            nonce = nonce.wrapping_add(1);
            let w = Work {
                extranonce: &en,
                ntime: 1633002641,
                nonce: black_box(nonce),
                version_bits: Some(0x4000),
            };
            let h = j.hash(&w, 0x1fffe000).unwrap();
            check(&h, &miner, &upstream, j.nbits)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
