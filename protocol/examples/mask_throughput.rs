//! `apply_mask` throughput on one core, for `scripts/bench_rounds.sh`: the
//! figure issue 14 compares with the machine's fastest ChaCha20 keystream.
//!
//!   cargo run --release -p tessera-protocol --example mask_throughput
//!
//! Prints `mask_gbps=<G>`: bytes of mask added to a 64 MiB vector per
//! second, over about a second of repeated passes (median pass time).

use std::time::Instant;

use tessera_protocol::secagg::mask::{Sign, apply_mask};

fn main() {
    let mut acc = vec![0u32; 16 << 20];
    let seed = [7u8; 32];
    apply_mask(&mut acc, &seed, Sign::Plus); // warm-up: pages touched
    let mut passes = Vec::new();
    let start = Instant::now();
    while passes.len() < 3 || start.elapsed().as_secs_f64() < 1.0 {
        let t = Instant::now();
        apply_mask(std::hint::black_box(&mut acc), &seed, Sign::Plus);
        passes.push(t.elapsed().as_secs_f64());
    }
    passes.sort_by(f64::total_cmp);
    let median = passes[passes.len() / 2];
    let bytes = (acc.len() * 4) as f64;
    println!("mask_gbps={:.2}", bytes / median / 1e9);
}
