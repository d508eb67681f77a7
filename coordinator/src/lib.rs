//! The coordinator: a tonic server that runs jobs round by round, persists
//! everything in SQLite, and never links Burn (it handles flat parameter
//! vectors only). Also the library behind the `tessera` CLI.
//!
//! - [`state`]: the in-memory view of the running job, shared by the RPC
//!   handlers and the driver; protocol decisions are delegated to the pure
//!   machines of `tessera_protocol`.
//! - [`driver`]: the loop that takes queued jobs through preprocessing, rounds
//!   and final evaluation.
//! - [`rpc`]: thin tonic services (identify, decode, call one method, encode).
//! - [`store`]: sqlx + SQLite persistence.
//! - [`ledger`]: the signed, site-endorsed chain, written in the same
//!   transactions as the state it records.
//! - [`cli`]: the `tessera` command for ML leads and regulators.
//! - [`ca`]: the consortium CA and its kits (`tessera ca`).
//! - [`tls`]: mutual TLS and who may call what.
//! - [`telemetry`]: Prometheus `/metrics` and `/healthz` for operators.
//! - [`prune`]: which stored models ended jobs no longer need.

pub mod ca;
pub mod cli;
pub mod driver;
pub mod ledger;
pub mod malicious;
pub mod prune;
pub mod rpc;
pub mod secure;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tls;

/// Wall-clock milliseconds since the Unix epoch, for stored timestamps.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
