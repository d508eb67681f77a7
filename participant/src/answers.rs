//! What this site last answered, so that it can answer a coordinator that
//! asks again after a restart, without revealing anything new.
//!
//! A coordinator that crashed restores an in-flight secure summation from a
//! snapshot taken when the current stage opened and asks the sites for that
//! stage's step again. A site whose client state machine has moved on must
//! not run it again (fresh shares, a second masked input or a second unmask
//! response could reveal its input), but it may send the very bytes it
//! already sent: the coordinator learns nothing it could not have kept. So a
//! site answers a repeated step only when the step is byte-identical to the
//! one it answered, and only with its byte-identical earlier answer; a step
//! with other content for a stage it already answered gets nothing.
//!
//! Plaintext rounds are simpler: a restarted coordinator starts the round
//! over and announces it again, and a site that already submitted may send
//! the same update again (the coordinator sees plaintext updates anyway),
//! for the same model only.

use std::collections::HashMap;

use tessera_protocol::pb::{self, sec_agg_message, sec_agg_step};

/// A summation: (job id, round; round 0 is the preprocessing statistics).
pub type Key = (u64, u32);

/// What a site sent in answer to a secure-aggregation step.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// A message sent with `SubmitSecAgg`: keys, shares, a signature on the
    /// survivor set, or an unmask response.
    Message(sec_agg_message::Kind),
    /// The masked input, streamed with `SubmitUpdate`.
    Masked(Vec<u32>),
}

/// The last answered step of each secure summation this site takes part in,
/// with its answer. Only the last one is repeatable: a restored coordinator
/// asks for the step of the stage it restored, which is the last one this
/// site can have answered (it answers a stage's step only once that stage
/// is open, and a stage opens only after the previous one closed).
#[derive(Default)]
pub struct Answers {
    last: HashMap<Key, (Vec<u8>, Answer)>,
}

/// The exact bytes of a step (its protobuf encoding, tag included): two
/// steps are the same step only if these are equal. No message in a step
/// has a map field, so the encoding is deterministic.
fn fingerprint(step: &sec_agg_step::Kind) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(step.encoded_len());
    step.encode(&mut bytes);
    bytes
}

impl Answers {
    /// Records `answer` as this site's answer to `step` of summation `key`,
    /// replacing any earlier one: only the last answered step is repeated.
    pub fn record(&mut self, key: Key, step: &sec_agg_step::Kind, answer: Answer) {
        self.last.insert(key, (fingerprint(step), answer));
    }

    /// The answer to send again if `step` is, byte for byte, the last step
    /// this site answered in summation `key`; `None` for any other step.
    pub fn repeat(&self, key: Key, step: &sec_agg_step::Kind) -> Option<&Answer> {
        let (answered, answer) = self.last.get(&key)?;
        (*answered == fingerprint(step)).then_some(answer)
    }

    /// Forgets the answers of summation `key` (its state was discarded, so
    /// what it answered cannot be followed up).
    pub fn forget(&mut self, key: Key) {
        self.last.remove(&key);
    }

    /// Keeps the answers of the summations `keep` says to keep.
    pub fn retain(&mut self, mut keep: impl FnMut(Key) -> bool) {
        self.last.retain(|&key, _| keep(key));
    }
}

/// The last plaintext update this site submitted for each job (its latest
/// round), kept so that a round started over by a restarted coordinator
/// gets the same update again, never a retrained one.
#[derive(Default)]
pub struct PlainUpdates {
    last: HashMap<u64, (pb::UpdateHeader, Vec<f32>)>,
}

impl PlainUpdates {
    /// Records the update submitted with `header` (for its job and round,
    /// trained from `header.base_model_hash`), replacing the job's earlier one.
    pub fn record(&mut self, header: pb::UpdateHeader, delta: Vec<f32>) {
        self.last.insert(header.job_id, (header, delta));
    }

    /// The update to submit again for `round` of `job_id` announced with
    /// model `model_hash`: the one submitted for that round of that model,
    /// if it is the job's last; `None` otherwise.
    pub fn repeat(&self, job_id: u64, round: u32, model_hash: &str) -> Option<(&pb::UpdateHeader, &[f32])> {
        let (header, delta) = self.last.get(&job_id)?;
        (header.round == round && header.base_model_hash == model_hash).then_some((header, delta.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advertise(members: &[&str], vector_len: u64) -> sec_agg_step::Kind {
        sec_agg_step::Kind::Advertise(pb::Advertise {
            members: members.iter().map(|m| m.to_string()).collect(),
            vector_len,
        })
    }

    fn survivors(sites: &[&str]) -> sec_agg_step::Kind {
        sec_agg_step::Kind::Survivors(pb::SurvivorList {
            sites: sites.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn keys_answer(byte: u8) -> Answer {
        Answer::Message(sec_agg_message::Kind::Keys(pb::AdvertisedKeys {
            signature: vec![byte; 4],
            ..Default::default()
        }))
    }

    #[test]
    fn an_identical_step_gets_the_same_answer() {
        let mut answers = Answers::default();
        answers.record((1, 2), &advertise(&["a", "b", "c"], 10), keys_answer(7));
        assert_eq!(
            answers.repeat((1, 2), &advertise(&["a", "b", "c"], 10)),
            Some(&keys_answer(7))
        );
        let masked = Answer::Masked(vec![1, 2, 3]);
        answers.record((1, 2), &survivors(&["a", "b"]), masked.clone());
        assert_eq!(answers.repeat((1, 2), &survivors(&["a", "b"])), Some(&masked));
    }

    /// The attack: fake a crash, "restore" a stage and ask its step again
    /// with other content (another member list, another survivor set), to
    /// get a second, different answer to one stage. Nothing is repeated.
    #[test]
    fn adversarial_a_restored_stage_with_other_content_gets_nothing() {
        let mut answers = Answers::default();
        answers.record((1, 2), &advertise(&["a", "b", "c"], 10), keys_answer(7));
        assert_eq!(answers.repeat((1, 2), &advertise(&["a", "b"], 10)), None);
        assert_eq!(answers.repeat((1, 2), &advertise(&["a", "b", "c"], 11)), None);
        assert_eq!(answers.repeat((1, 2), &advertise(&["a", "c", "b"], 10)), None);
        answers.record((1, 2), &survivors(&["a", "b", "c"]), keys_answer(8));
        assert_eq!(answers.repeat((1, 2), &survivors(&["a", "b"])), None);
        // Another kind of step with the same fields is another step.
        let signatures = sec_agg_step::Kind::Signatures(pb::SurvivorSignatures::default());
        let empty_survivors = sec_agg_step::Kind::Survivors(pb::SurvivorList::default());
        answers.record((1, 3), &signatures, keys_answer(9));
        assert_eq!(answers.repeat((1, 3), &empty_survivors), None);
        assert_eq!(answers.repeat((1, 3), &signatures), Some(&keys_answer(9)));
    }

    #[test]
    fn another_round_or_job_gets_nothing() {
        let mut answers = Answers::default();
        let step = advertise(&["a", "b", "c"], 10);
        answers.record((1, 2), &step, keys_answer(7));
        assert_eq!(answers.repeat((1, 3), &step), None);
        assert_eq!(answers.repeat((1, 1), &step), None);
        assert_eq!(answers.repeat((2, 2), &step), None);
    }

    #[test]
    fn only_the_last_answered_step_is_repeated() {
        let mut answers = Answers::default();
        let first = advertise(&["a", "b", "c"], 10);
        answers.record((1, 2), &first, keys_answer(7));
        answers.record((1, 2), &survivors(&["a", "b", "c"]), keys_answer(8));
        assert_eq!(answers.repeat((1, 2), &first), None);
        assert_eq!(
            answers.repeat((1, 2), &survivors(&["a", "b", "c"])),
            Some(&keys_answer(8))
        );
        answers.forget((1, 2));
        assert_eq!(answers.repeat((1, 2), &survivors(&["a", "b", "c"])), None);
    }

    #[test]
    fn retain_drops_earlier_rounds() {
        let mut answers = Answers::default();
        let step = advertise(&["a", "b", "c"], 10);
        for key in [(1, 0), (1, 1), (1, 2), (2, 1)] {
            answers.record(key, &step, keys_answer(key.1 as u8));
        }
        answers.retain(|(job, round)| job != 1 || round >= 2);
        assert_eq!(answers.repeat((1, 0), &step), None);
        assert_eq!(answers.repeat((1, 1), &step), None);
        assert_eq!(answers.repeat((1, 2), &step), Some(&keys_answer(2)));
        assert_eq!(answers.repeat((2, 1), &step), Some(&keys_answer(1)));
    }

    #[test]
    fn a_plaintext_update_is_repeated_for_its_round_and_model_only() {
        let header = |round: u32, model: &str| pb::UpdateHeader {
            job_id: 4,
            round,
            base_model_hash: model.to_owned(),
            ..Default::default()
        };
        let mut updates = PlainUpdates::default();
        assert!(updates.repeat(4, 1, "m1").is_none());
        updates.record(header(1, "m1"), vec![0.5, -1.0]);
        let (h, delta) = updates.repeat(4, 1, "m1").expect("the same round and model");
        assert_eq!((h, delta), (&header(1, "m1"), &[0.5, -1.0][..]));
        assert!(updates.repeat(4, 1, "m2").is_none(), "another model");
        assert!(updates.repeat(4, 2, "m1").is_none(), "another round");
        assert!(updates.repeat(5, 1, "m1").is_none(), "another job");
        updates.record(header(2, "m2"), vec![1.0]);
        assert!(updates.repeat(4, 1, "m1").is_none(), "only the job's last round");
        assert!(updates.repeat(4, 2, "m2").is_some());
    }
}
