//! `tessera ledger report`: one self-contained HTML page (no scripts, no
//! external resources) that a regulator can open, print or archive.

use std::collections::BTreeMap;
use std::fmt::Write;

use tessera_protocol::ledger::payload::{Metrics, Payload};

use super::{Loaded, parse, summary, utc, verdict};

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;\
vertical-align:top}th{background:#f3f3f3}code{font-size:90%}.ok{background:#e6f4ea;border:2px solid #1e8e3e;\
padding:1em}.bad{background:#fce8e6;border:2px solid #d93025;padding:1em}";

/// Renders the page. Verification runs first; its verdict heads the page.
pub(crate) fn render(loaded: &Loaded) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Tessera ledger report</title>\
         <style>{STYLE}</style></head><body><h1>Tessera ledger report</h1><p>Source: <code>{}</code></p>",
        esc(&loaded.source)
    );
    let quorum = match verdict(loaded) {
        Ok((r, models)) => {
            let _ = write!(
                h,
                "<div id=\"verdict\" class=\"ok\"><strong>Ledger intact.</strong> {} blocks verified: every hash \
                 link, coordinator signature and site endorsement checks against the genesis membership; {} \
                 stored model(s) match their hashes; {} block(s) at the tail await their endorsement quorum.<br>\
                 Consortium <strong>{}</strong>, genesis block <code>{}</code>.</div>",
                r.blocks,
                models,
                r.pending,
                esc(&r.genesis.consortium),
                hex::encode(r.genesis_hash)
            );
            let _ = write!(
                h,
                "<h2>Members at genesis</h2><table><tr><th>site</th><th>Ed25519 key</th></tr>{}</table>\
                 <p>Coordinator key <code>{}</code>; a block is final when a majority of the members at that block \
                 endorse it ({} of the genesis members; the subject of a membership change does not count).</p>",
                r.genesis
                    .sites
                    .iter()
                    .map(|m| format!("<tr><td>{}</td><td><code>{}</code></td></tr>", esc(&m.id), esc(&m.key)))
                    .collect::<String>(),
                esc(&r.genesis.coordinator_key),
                r.genesis.quorum
            );
            r.genesis.quorum
        }
        Err(e) => {
            let _ = write!(
                h,
                "<div id=\"verdict\" class=\"bad\"><strong>LEDGER VERIFICATION FAILED:</strong> {}. \
                 Nothing below can be relied on.</div>",
                esc(&e)
            );
            0
        }
    };

    // Metrics by (job, model_of_round), to show next to the round that
    // produced the model.
    let mut metrics: BTreeMap<(u64, u32), &Metrics> = BTreeMap::new();
    let parsed: Vec<_> = loaded.blocks.iter().map(|b| (b, parse(b))).collect();
    for (_, p) in &parsed {
        if let Some((_, Payload::Metrics(m))) = p {
            metrics.insert((m.job_id, m.model_of_round), m);
        }
    }

    h.push_str("<h2>Jobs</h2><table id=\"jobs\"><tr><th>job</th><th>name</th><th>created</th><th>job file SHA-256</th><th>site decisions (signed)</th><th>outcome</th></tr>");
    let mut decisions: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (_, p) in &parsed {
        if let Some((_, Payload::JobAccepted(a))) = p {
            let verdict = if a.accepted { "accepted" } else { "rejected" };
            decisions
                .entry(a.job_id)
                .or_default()
                .push(format!("{}: {verdict}", a.site));
        }
    }
    let mut ended: BTreeMap<u64, String> = BTreeMap::new();
    for (_, p) in &parsed {
        if let Some((_, Payload::JobEnded(e))) = p {
            ended.insert(e.job_id, summary(&Payload::JobEnded(e.clone())));
        }
    }
    for (_, p) in &parsed {
        if let Some((header, Payload::JobCreated(j))) = p {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
                j.job_id,
                esc(&j.name),
                utc(header.timestamp_ms),
                esc(&j.job_sha256),
                esc(&decisions.get(&j.job_id).map(|d| d.join(", ")).unwrap_or_default()),
                esc(ended.get(&j.job_id).map_or("running", String::as_str))
            );
        }
    }
    h.push_str("</table>");

    h.push_str(
        "<h2>Rounds</h2><table id=\"rounds\"><tr><th>block</th><th>job</th><th>round</th><th>time (UTC)</th>\
         <th>contributors</th><th>dropouts (phase)</th><th>endorsed by</th><th>model SHA-256</th>\
         <th>evaluation of this model</th></tr>",
    );
    for (block, p) in &parsed {
        let Some((header, Payload::RoundCompleted(r))) = p else {
            continue;
        };
        let endorsers: Vec<String> = block.endorsements.iter().map(|e| e.site.to_string()).collect();
        let eval = metrics.get(&(r.job_id, r.round)).map_or(String::from("-"), |m| {
            let mut s = m
                .pooled
                .as_ref()
                .map(|p| {
                    format!(
                        "pooled {} ({} sites, {} records)",
                        super::pooled_summary(p),
                        p.n_sites,
                        p.n_test
                    )
                })
                .unwrap_or_default();
            for site in &m.sites {
                let _ = write!(s, "<br>{}: accuracy {:.4}", esc(&site.site), site.accuracy);
                if let Some(auc) = site.auc.filter(|a| a.is_finite()) {
                    let _ = write!(s, ", ROC AUC {auc:.4}");
                }
            }
            s
        });
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} (majority at genesis {}): {}</td>\
             <td><code>{}</code></td><td>{}</td></tr>",
            header.height,
            r.job_id,
            r.round,
            utc(header.timestamp_ms),
            esc(&r.contributors.join(", ")),
            esc(&r
                .dropouts
                .iter()
                .map(|d| format!("{} ({})", d.site, d.phase))
                .collect::<Vec<_>>()
                .join(", ")),
            endorsers.len(),
            quorum,
            esc(&endorsers.join(", ")),
            esc(&r.model_sha256),
            eval
        );
    }
    h.push_str("</table><h2>All blocks</h2><table id=\"blocks\"><tr><th>height</th><th>time (UTC)</th><th>kind</th><th>what</th><th>hash</th></tr>");
    for (block, p) in &parsed {
        match p {
            Some((header, payload)) => {
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                    header.height,
                    utc(header.timestamp_ms),
                    header.kind.name(),
                    esc(&summary(payload)),
                    hex::encode(block.hash())
                );
            }
            None => h.push_str("<tr><td colspan=\"5\">(block does not decode)</td></tr>"),
        }
    }
    h.push_str(
        "</table><p>Generated by <code>tessera ledger report</code>. The format is specified in \
                docs/ledger-format.md; any independent verifier can re-check this ledger.</p></body></html>\n",
    );
    h
}
