//! A coordinator that attacks its own sites, for the end-to-end adversarial
//! tests (`tests/tests/malicious.rs`): real daemons must refuse. It can only
//! be armed in a build with the `malicious` feature *and* debug assertions
//! (`--malicious ATTACK`); in any other build [`attack`] is always `None`,
//! so no release binary can attack, whatever features are unified.

/// The attack a malicious coordinator mounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(all(feature = "malicious", debug_assertions), derive(clap::ValueEnum))]
pub enum Attack {
    /// Ask every site for its preprocessing statistics in the clear, though
    /// the job is secure.
    PlaintextStats,
    /// Show each site a different survivor set in the consistency check,
    /// forward every signature unchecked, and collect whatever is revealed.
    SplitViews,
    /// Serve every released aggregate (the statistics sum, each round's
    /// sum) with one word changed from the one its ledger block commits to.
    TamperedAggregate,
    /// Add a rare code to another site's category proposal (or leave the
    /// receiving site's own out) when relaying the cohort's proposals, to
    /// learn the pooled count of a code no site chose to name.
    InjectCategory,
    /// Announce the training rounds as evaluations only (`train = false`),
    /// to have the sites send the final evaluation's score histograms in
    /// another summation (whose difference with the real final one, over
    /// survivor sets that differ by one site, gives that site's prevalence).
    EvaluateTwice,
    /// Announce twice the class weight the job's statistics give, to skew
    /// what the sites' training optimises.
    SkewClassWeight,
}

#[cfg(all(feature = "malicious", debug_assertions))]
static ATTACK: std::sync::OnceLock<Attack> = std::sync::OnceLock::new();

/// Arms the attack (once, at start-up).
#[cfg(all(feature = "malicious", debug_assertions))]
pub fn arm(attack: Attack) {
    let _ = ATTACK.set(attack);
    tracing::warn!(?attack, "MALICIOUS COORDINATOR (test build): attacking the sites");
}

/// The armed attack, if any.
pub fn attack() -> Option<Attack> {
    #[cfg(all(feature = "malicious", debug_assertions))]
    {
        ATTACK.get().copied()
    }
    #[cfg(not(all(feature = "malicious", debug_assertions)))]
    {
        None
    }
}
