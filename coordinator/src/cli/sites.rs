//! `tessera sites`: the fleet as the coordinator sees it, for the operator
//! who asks "which hospitals are up, on which version, and why is this one
//! not taking part?".

use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;
use tessera_protocol::pb;
use tessera_protocol::pb::jobs_client::JobsClient;

use super::{CliResult, connect};

pub(crate) async fn exec(addr: &str, json: bool) -> CliResult {
    let mut client = JobsClient::new(connect(addr).await?);
    let sites = client.list_sites(pb::ListSitesRequest {}).await?.into_inner().sites;
    if json {
        let rows: Vec<_> = sites.iter().map(site_json).collect();
        println!("{}", serde_json::to_string_pretty(&rows).context("cannot encode JSON")?);
        return Ok(ExitCode::SUCCESS);
    }
    let now_ms = crate::unix_ms();
    let width = sites.iter().map(|s| s.site_id.len()).max().unwrap_or(4).max(4);
    println!(
        "{:<width$}  {:<9}  {:<8}  {:<12}  {:<28}  last problem",
        "site", "connected", "version", "last heard", "running job"
    );
    for s in &sites {
        let heard = match s.last_seen_ms {
            0 => "never".to_owned(),
            at => format!("{} ago", ago((now_ms - at).max(0) as u64 / 1000)),
        };
        let job = match (s.job_id, s.job_state.as_str()) {
            (0, _) => "-".to_owned(),
            (id, "") => format!("{id} ({}): not decided", s.job_phase),
            (id, state) => format!("{id} ({}): {state}", s.job_phase),
        };
        let roster = if s.in_roster { "" } else { " (not in roster)" };
        println!(
            "{:<width$}  {:<9}  {:<8}  {:<12}  {:<28}  {}{roster}",
            s.site_id,
            if s.connected { "yes" } else { "no" },
            if s.version.is_empty() { "-" } else { &s.version },
            heard,
            job,
            if s.last_problem.is_empty() {
                "-"
            } else {
                &s.last_problem
            },
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn site_json(s: &pb::SiteInfo) -> serde_json::Value {
    json!({
        "site_id": s.site_id,
        "in_roster": s.in_roster,
        "connected": s.connected,
        "version": s.version,
        "last_seen_ms": s.last_seen_ms,
        "job_id": (s.job_id != 0).then_some(s.job_id),
        "job_phase": s.job_phase,
        "job_state": s.job_state,
        "last_problem": s.last_problem,
    })
}

/// Seconds as a person reads them: `42 s`, `3 min`, `5 h`, `2 d`.
fn ago(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s} s"),
        s if s < 2 * 3600 => format!("{} min", s / 60),
        s if s < 2 * 86_400 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::ago;

    #[test]
    fn ages_read_as_a_person_says_them() {
        assert_eq!(ago(0), "0 s");
        assert_eq!(ago(119), "119 s");
        assert_eq!(ago(120), "2 min");
        assert_eq!(ago(7199), "119 min");
        assert_eq!(ago(7200), "2 h");
        assert_eq!(ago(3 * 86_400), "3 d");
    }
}
