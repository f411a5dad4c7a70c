//! Resume after a restart: the engine picks up the state the ledger
//! recovered (see [`Ledger::recover`](crate::ledger::Ledger::recover)).

use serde::{Deserialize, Serialize};

use crate::command::Action;
use crate::fleet::MinerId;
use crate::signal::DrEvent;
use crate::time::Timestamp;

use super::engine::step_to_action;
use super::*;

/// What a restarted engine needs from the ledger (see
/// [`Ledger::recover`](crate::ledger::Ledger::recover)).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    /// First command id to use.
    pub next_command_id: u64,
    /// Miners whose last command left them below nominal (curtailed, or
    /// under a fine-tune power target), with that command.
    pub curtailed: Vec<(MinerId, Action, Timestamp)>,
    /// DR events not ended, with their baseline kW.
    pub events: Vec<(DrEvent, f64)>,
}

impl Engine {
    /// Restore state recovered from the ledger after a restart: command ids
    /// continue, open DR events come back, and miners whose last command
    /// curtailed them stay curtailed (no command is re-sent; wakes wait for a
    /// fresh signal or [`PolicyConfig::resume_hold`], then the min-off dwell
    /// from the recorded time, then restore batching).
    ///
    /// A power target is a step of the miner's curtail chain only at the
    /// chain's own value (its minimum power); any other value was a
    /// fine-tune, and the miner is held running under it. Taking it for the
    /// chain's step would have the planner count the miner at its minimum
    /// and lower it there, wake another to make up, and limit others.
    pub fn resume(&mut self, now: Timestamp, resume: Resume) -> Result<(), PolicyError> {
        self.next_command = self.next_command.max(resume.next_command_id);
        for (id, action, at) in resume.curtailed {
            let Some(idx) = self.fleet.index_of(id) else {
                continue; // miner removed from inventory since
            };
            // Which step of the chain `action` is, if it is one.
            let chain_step = (0..3u8).find(|&esc| {
                self.curtail_step_at(idx, esc)
                    .is_some_and(|step| step_to_action(step) == action)
            });
            let c = &mut self.ctl[idx as usize];
            match action {
                Action::SetPowerTarget(w) if chain_step.is_none() => {
                    c.applied.limit = Some(w);
                    c.held = Some(Held::Limit(w));
                    c.target = Target::Limit(w);
                    c.on = true;
                }
                Action::Sleep | Action::Park | Action::SetPowerTarget(_) => {
                    match action {
                        Action::Sleep => c.applied.sleep = true,
                        Action::Park => c.applied.parked = true,
                        _ => c.applied.limit = action.value(),
                    }
                    c.held = Some(Held::Curtail);
                    c.econ_on = false;
                    c.on = !c.applied.sleep && !c.applied.parked;
                    c.since = at;
                    c.target = Target::Curtail { forced: false };
                    // The chain points at what was applied, so nothing is re-sent.
                    c.esc = chain_step.unwrap_or(0);
                }
                _ => continue,
            }
            c.gen = c.gen.wrapping_add(1);
            let state = self.derive_state(idx);
            self.fleet.by_index_mut(idx).state = state;
        }
        for (ev, baseline_kw) in resume.events {
            if ev.end.is_some_and(|end| end <= now) {
                continue;
            }
            self.events.retain(|s| s.ev.id != ev.id);
            self.events.push(EventSlot {
                activation: ev.start,
                ev,
                baseline_kw,
                state: DrEventState::Scheduled,
            });
        }
        self.resumed_at = Some(now);
        self.hold_until = Some(now + self.cfg.resume_hold);
        self.replan(now);
        Ok(())
    }
}
