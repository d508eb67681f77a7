//! `tessera ledger`: the regulator's tools. Everything here works offline on a
//! ledger file (the coordinator's database or a site's replica), or read-only
//! against a coordinator; nothing here needs to trust the operator.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use tessera_protocol::ids::{SiteId, sha256_hex};
use tessera_protocol::ledger::equivocation::{Conflict, check_conflicts};
use tessera_protocol::ledger::payload::Payload;
use tessera_protocol::ledger::receipt::{self, Receipt};
use tessera_protocol::ledger::store::LedgerStore;
use tessera_protocol::ledger::verify::{Report, verify_chain};
use tessera_protocol::ledger::{Block, Header};
use tessera_protocol::pb::ledger_client::LedgerClient;
use tessera_protocol::{pb, wire};

use super::{CliError, CliResult, connect};

mod report;

#[derive(Subcommand)]
pub(crate) enum LedgerCommand {
    /// Check every hash link, signature and endorsement against the genesis
    /// membership, and stored models against their hashes. Exit 0 when
    /// intact and final, 1 naming the first bad block, or the first block of
    /// a tail that still lacks its endorsement quorum.
    Verify {
        /// A ledger file (coordinator database or site replica). Without it,
        /// the coordinator's chain is read through its read-only API.
        path: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// Accept a tail of blocks that are intact but not yet endorsed by a
        /// quorum of sites (exit 0, with a warning). Never accepts a block
        /// that fails verification.
        #[arg(long)]
        allow_pending: bool,
    },
    /// List the blocks, readable or as JSON.
    Show {
        path: Option<PathBuf>,
        #[arg(long)]
        job: Option<u64>,
        #[arg(long)]
        round: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Write one self-contained ledger file that verifies on its own (no
    /// `-wal` file beside it): a copy of a ledger file (coordinator
    /// database or site replica) with the pages its write-ahead log holds,
    /// or, without a file, the coordinator's chain read through its API.
    Export {
        path: Option<PathBuf>,
        /// The file to write; it must not exist.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write one self-contained HTML page for a regulator. Exit 1 (the page
    /// is still written, saying why) when the ledger does not verify.
    Report {
        path: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a site's proof that its contribution to a round was included.
    Receipt {
        path: Option<PathBuf>,
        #[arg(long)]
        site: String,
        #[arg(long)]
        job: u64,
        #[arg(long)]
        round: u32,
        /// Where to write the receipt (JSON); standard output without it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check a receipt offline.
    CheckReceipt { file: PathBuf },
}

/// A chain as read from a file or a coordinator.
pub(crate) struct Loaded {
    pub blocks: Vec<Block>,
    pub stored_hashes: Option<Vec<[u8; 32]>>,
    /// (hash, bytes) when the source holds models.
    pub models: Option<Vec<(String, Vec<u8>)>>,
    /// Equivocation evidence a site's replica kept (`ledger_conflicts`).
    pub conflicts: Vec<Conflict>,
    pub source: String,
}

async fn load(addr: &str, path: Option<&PathBuf>) -> Result<Loaded, CliError> {
    match path {
        Some(path) => {
            if !path.exists() {
                return Err(CliError::User(format!("no ledger file at {}", path.display())));
            }
            let store = LedgerStore::open_read_only(path)
                .await
                .with_context(|| format!("cannot open {}", path.display()))?;
            let stored = store.blocks().await.map_err(|e| {
                let wal = PathBuf::from(format!("{}-wal", path.display()));
                let hint = if wal.exists() {
                    String::new()
                } else {
                    format!(
                        ". If it is a copy of a running (or crashed) coordinator's database or site's ledger.db, \
                         its latest pages are in {}, which must be copied with it; `tessera ledger export` \
                         writes a copy that needs none",
                        wal.display()
                    )
                };
                CliError::User(format!("{} is not a Tessera ledger: {e}{hint}", path.display()))
            })?;
            let models = store.models().await.context("cannot read models")?;
            let conflicts = store.conflicts().await.context("cannot read equivocation evidence")?;
            let (blocks, hashes) = stored.into_iter().unzip();
            Ok(Loaded {
                blocks,
                stored_hashes: Some(hashes),
                models,
                conflicts,
                source: path.display().to_string(),
            })
        }
        None => {
            let mut client = LedgerClient::new(connect(addr).await?);
            let mut blocks = Vec::new();
            loop {
                let response = client
                    .get_blocks(pb::GetBlocksRequest {
                        from_height: blocks.len() as u64,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                let n = response.blocks.len();
                blocks.extend(response.blocks.into_iter().map(wire::block_from_pb));
                if n == 0 || blocks.len() as u64 >= response.chain_length {
                    break;
                }
            }
            Ok(Loaded {
                blocks,
                stored_hashes: None,
                models: None,
                conflicts: Vec::new(),
                source: addr.to_owned(),
            })
        }
    }
}

/// The verdict on a loaded chain: the chain rules, the equivocation
/// evidence, then the stored models.
pub(crate) fn verdict(loaded: &Loaded) -> Result<(Report, usize), String> {
    let report = verify_chain(&loaded.blocks, loaded.stored_hashes.as_deref()).map_err(|e| e.to_string())?;
    let coordinator: [u8; 32] = hex::decode(&report.genesis.coordinator_key)
        .ok()
        .and_then(|k| k.try_into().ok())
        .expect("a verified genesis has a 32-byte coordinator key");
    let hashes: Vec<[u8; 32]> = loaded.blocks.iter().map(Block::hash).collect();
    check_conflicts(&hashes, &coordinator, &loaded.conflicts).map_err(|e| e.to_string())?;
    let Some(models) = &loaded.models else {
        return Ok((report, 0));
    };
    for (hash, data) in models {
        if &sha256_hex(data) != hash {
            let block = report.models.iter().find(|(_, m)| m == hash).map(|(h, _)| *h);
            return Err(match block {
                Some(h) => format!("block {h}: stored model {hash} does not match its hash"),
                None => format!("stored model {hash} does not match its hash"),
            });
        }
    }
    for (height, hash) in &report.models {
        // A pruned model's weights may be gone: a later block says so.
        if !report.pruned.contains(hash) && !models.iter().any(|(h, _)| h == hash) {
            return Err(format!("block {height}: model {hash} is not stored"));
        }
    }
    Ok((report, models.len()))
}

pub(crate) async fn exec(addr: &str, cmd: LedgerCommand) -> CliResult {
    match cmd {
        LedgerCommand::Verify {
            path,
            json,
            allow_pending,
        } => {
            let loaded = load(addr, path.as_ref()).await?;
            let result = verdict(&loaded);
            if json {
                let value = match &result {
                    Ok((r, models)) => serde_json::json!({
                        "intact": true,
                        "final": r.pending == 0,
                        "source": loaded.source,
                        "blocks": r.blocks,
                        "pending": r.pending,
                        "first_pending": r.first_pending.map(|(height, endorsements, quorum)| serde_json::json!({
                            "height": height, "endorsements": endorsements, "quorum": quorum,
                        })),
                        "models_checked": models,
                        "consortium": r.genesis.consortium,
                        "genesis_hash": hex::encode(r.genesis_hash),
                    }),
                    Err(e) => serde_json::json!({ "intact": false, "source": loaded.source, "error": e }),
                };
                println!("{value:#}");
            }
            match result {
                Ok((r, models)) => {
                    if !json {
                        println!(
                            "ledger intact: {} blocks, consortium `{}`, genesis {}",
                            r.blocks,
                            r.genesis.consortium,
                            hex::encode(r.genesis_hash)
                        );
                        println!(
                            "  {} block(s) at the tail still awaiting their endorsement quorum",
                            r.pending
                        );
                        match &loaded.models {
                            Some(_) => println!("  {models} stored model(s) match their hashes"),
                            None => println!("  no models in this source (a replica or the API): not checked"),
                        }
                    }
                    match r.first_pending {
                        Some((height, have, need)) if !allow_pending => {
                            eprintln!(
                                "ledger NOT final ({}): block {height} and the {} block(s) after it lack their \
                                 endorsement quorum (block {height}: {have} of {need} endorsements); a coordinator \
                                 could still show other sites another history there. --allow-pending accepts an \
                                 unendorsed tail",
                                loaded.source,
                                r.pending - 1
                            );
                            Ok(ExitCode::from(1))
                        }
                        Some((height, _, _)) => {
                            eprintln!("warning: blocks from {height} on are not final yet (--allow-pending)");
                            Ok(ExitCode::SUCCESS)
                        }
                        None => Ok(ExitCode::SUCCESS),
                    }
                }
                Err(e) => {
                    eprintln!("ledger verification FAILED ({}): {e}", loaded.source);
                    Ok(ExitCode::from(1))
                }
            }
        }
        LedgerCommand::Show { path, job, round, json } => {
            let loaded = load(addr, path.as_ref()).await?;
            show(&loaded, job, round, json)
        }
        LedgerCommand::Export { path, out } => export(addr, path.as_ref(), &out).await,
        LedgerCommand::Report { path, out } => {
            let loaded = load(addr, path.as_ref()).await?;
            let html = report::render(&loaded);
            std::fs::write(&out, html).with_context(|| format!("cannot write {}", out.display()))?;
            // The page says what is wrong; a script that only checks the
            // exit status must learn it too.
            match verdict(&loaded) {
                Ok(_) => {
                    eprintln!("wrote {}", out.display());
                    Ok(ExitCode::SUCCESS)
                }
                Err(reason) => {
                    eprintln!("wrote {}, for a ledger that does not verify: {reason}", out.display());
                    Ok(ExitCode::from(1))
                }
            }
        }
        LedgerCommand::Receipt {
            path,
            site,
            job,
            round,
            out,
        } => {
            let site = SiteId::new(&site).map_err(|e| CliError::User(e.to_string()))?;
            let loaded = load(addr, path.as_ref()).await?;
            verdict(&loaded).map_err(|e| CliError::User(format!("the ledger does not verify: {e}")))?;
            let block = loaded
                .blocks
                .iter()
                .find(|b| match parse(b) {
                    Some((_, Payload::RoundCompleted(r))) => r.job_id == job && r.round == round,
                    _ => false,
                })
                .ok_or_else(|| CliError::User(format!("no block for round {round} of job {job}")))?;
            let receipt = receipt::build(&loaded.blocks[0], block, &site).map_err(|e| CliError::User(e.to_string()))?;
            let text = serde_json::to_string_pretty(&receipt).context("cannot encode receipt")?;
            match out {
                Some(out) => {
                    std::fs::write(&out, text).with_context(|| format!("cannot write {}", out.display()))?;
                    eprintln!("wrote {}", out.display());
                }
                None => println!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        LedgerCommand::CheckReceipt { file } => {
            let text =
                std::fs::read_to_string(&file).map_err(|e| CliError::User(format!("{}: {e}", file.display())))?;
            let receipt: Receipt = serde_json::from_str(&text)
                .map_err(|e| CliError::User(format!("{} is not a receipt: {e}", file.display())))?;
            match receipt::check(&receipt) {
                Ok(c) => {
                    println!(
                        "receipt valid: `{}` contributed to round {} of job {}",
                        receipt.site, receipt.round, receipt.job_id
                    );
                    println!("  block {} ({})", c.block_height, hex::encode(c.block_hash));
                    println!(
                        "  endorsed by {} (genesis majority {}): {}",
                        c.endorsed_by.len(),
                        c.quorum,
                        c.endorsed_by.join(", ")
                    );
                    println!(
                        "  consortium `{}`, genesis {} (compare with the published genesis hash)",
                        c.consortium,
                        hex::encode(c.genesis_hash)
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("{e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}

/// `tessera ledger export`: writes the copy, then verifies it alone.
async fn export(addr: &str, path: Option<&PathBuf>, out: &Path) -> CliResult {
    if out.exists() {
        return Err(CliError::User(format!(
            "{} exists: the export never overwrites a file",
            out.display()
        )));
    }
    match path {
        Some(path) => {
            if !path.exists() {
                return Err(CliError::User(format!("no ledger file at {}", path.display())));
            }
            let store = LedgerStore::open_read_only(path)
                .await
                .with_context(|| format!("cannot open {}", path.display()))?;
            store
                .blocks()
                .await
                .map_err(|e| CliError::User(format!("{} is not a Tessera ledger: {e}", path.display())))?;
            store
                .export_to(out)
                .await
                .with_context(|| format!("cannot write {}", out.display()))?;
        }
        None => {
            let loaded = load(addr, None).await?;
            let store = LedgerStore::open(out)
                .await
                .with_context(|| format!("cannot create {}", out.display()))?;
            for (height, block) in loaded.blocks.iter().enumerate() {
                store
                    .append(height as u64, block)
                    .await
                    .with_context(|| format!("cannot write {}", out.display()))?;
            }
            store.pool().close().await;
        }
    }
    LedgerStore::make_standalone(out)
        .await
        .with_context(|| format!("cannot finish {}", out.display()))?;
    let loaded = load(addr, Some(&out.to_path_buf())).await?;
    match verdict(&loaded) {
        Ok((report, _)) => {
            eprintln!(
                "wrote {}: {} blocks, intact{}; it verifies on its own: tessera ledger verify {}",
                out.display(),
                report.blocks,
                if report.pending > 0 {
                    format!(" ({} at the tail not yet final)", report.pending)
                } else {
                    String::new()
                },
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(reason) => {
            eprintln!("wrote {}, but it does not verify: {reason}", out.display());
            Ok(ExitCode::from(1))
        }
    }
}

/// A block's header and payload, if they decode.
pub(crate) fn parse(block: &Block) -> Option<(Header, Payload)> {
    let header = Header::decode(&block.header).ok()?;
    let payload = Payload::parse(header.kind, &block.payload).ok()?;
    Some((header, payload))
}

/// One line describing a payload.
pub(crate) fn summary(payload: &Payload) -> String {
    let short = |h: &str| h.chars().take(12).collect::<String>();
    match payload {
        Payload::Genesis(g) => format!(
            "consortium `{}`: {} sites, quorum {} (a majority of the current members)",
            g.consortium,
            g.sites.len(),
            g.quorum
        ),
        Payload::JobCreated(j) => format!(
            "job {} `{}` created (job file {})",
            j.job_id,
            j.name,
            short(&j.job_sha256)
        ),
        Payload::JobAccepted(a) => format!(
            "job {}: {} {} ({})",
            a.job_id,
            a.site,
            if a.accepted { "accepted" } else { "rejected" },
            a.reason
        ),
        Payload::RoundCompleted(r) => format!(
            "job {} round {}: {} contributed, {} dropped, model {}",
            r.job_id,
            r.round,
            r.contributors.len(),
            r.dropouts.len(),
            short(&r.model_sha256)
        ),
        Payload::Metrics(m) => format!(
            "job {} model of round {}: {} site report(s){}",
            m.job_id,
            m.model_of_round,
            m.sites.len(),
            m.pooled
                .as_ref()
                .map(|p| format!(", pooled {} over {} sites", pooled_summary(p), p.n_sites))
                .unwrap_or_default()
        ),
        Payload::JobEnded(e) => format!(
            "job {} {} after {} rounds{}",
            e.job_id,
            e.status,
            e.rounds_done,
            if e.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", e.reason)
            }
        ),
        Payload::MembershipChange(c) => format!("{} `{}` ({})", c.change, c.site.id, c.reason),
        Payload::Summation(s) => format!(
            "job {} {} summed over {} sites, {} dropped (sum {})",
            s.job_id,
            s.purpose.replace('_', " "),
            s.contributors.len(),
            s.dropouts.len(),
            short(&s.aggregate_sha256)
        ),
        Payload::CohortSealed(c) => format!(
            "job {} cohort sealed: {} ({} sites)",
            c.job_id,
            c.cohort.join(", "),
            c.cohort.len()
        ),
        Payload::ModelsPruned(p) => format!(
            "job {}: the stored weights of {} model(s) deleted at the request of {} ({})",
            p.job_id,
            p.models.len(),
            p.by,
            p.reason
        ),
    }
}

/// UTC time of a block, as `YYYY-MM-DD HH:MM:SS`.
pub(crate) fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn show(loaded: &Loaded, job: Option<u64>, round: Option<u32>, json: bool) -> CliResult {
    let mut rows = Vec::new();
    for block in &loaded.blocks {
        let Some((header, payload)) = parse(block) else {
            return Err(CliError::User(format!(
                "block {} does not decode; run `tessera ledger verify`",
                rows.len()
            )));
        };
        if job.is_some() && payload.job_id() != job {
            continue;
        }
        if let Some(r) = round {
            let matches = match &payload {
                Payload::RoundCompleted(p) => p.round == r,
                Payload::Metrics(m) => m.model_of_round == r,
                _ => false,
            };
            if !matches {
                continue;
            }
        }
        rows.push((header, payload, block));
    }
    if json {
        let value: Vec<serde_json::Value> = rows
            .iter()
            .map(|(h, _, b)| {
                serde_json::json!({
                    "height": h.height,
                    "hash": hex::encode(h.hash()),
                    "timestamp_ms": h.timestamp_ms,
                    "kind": h.kind.name(),
                    "payload": serde_json::from_slice::<serde_json::Value>(&b.payload).unwrap_or_default(),
                    "endorsed_by": b.endorsements.iter().map(|e| e.site.to_string()).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&value).context("cannot encode")?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>6}  {:<19}  {:<17}  {:<8}  what",
        "height", "time (UTC)", "kind", "endorsed"
    );
    for (h, p, b) in &rows {
        println!(
            "{:>6}  {:<19}  {:<17}  {:<8}  {}",
            h.height,
            utc(h.timestamp_ms),
            h.kind.name(),
            b.endorsements.len(),
            summary(p)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A pooled evaluation in a few words: the accuracy (final models), or the
/// loss, and the ROC AUC and Brier score where the block records them.
pub(crate) fn pooled_summary(p: &tessera_protocol::ledger::payload::PooledMetrics) -> String {
    let mut s = match p.accuracy {
        Some(accuracy) => format!("accuracy {accuracy:.4}"),
        None => format!("loss {:.4}", p.loss),
    };
    if let Some(b) = &p.binary {
        if let Some(auc) = b.roc_auc {
            s.push_str(&format!(", ROC AUC {auc:.4}"));
        }
        if let Some(brier) = b.brier {
            s.push_str(&format!(", Brier {brier:.4}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        // 2026-11-24 04:15:02 UTC
        assert_eq!(utc(1_795_493_702_000), "2026-11-24 04:15:02");
        // Leap day.
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
    }
}
