//! Group channels of one SV2 connection, sans-IO: which group each standard
//! channel is in, which job ids the group's jobs carry, and what to send
//! when a channel has a new job.
//!
//! Stratum V2 (mining protocol, "Group Channel", `SetGroupChannel`,
//! `NewExtendedMiningJob`, `SetNewPrevHash`): channels of one connection can
//! be grouped under a group channel id taken from the same id space as the
//! channel ids; a `NewExtendedMiningJob` or `SetNewPrevHash` addressed to the
//! group applies to every channel in it, and a standard channel builds its
//! coinbase as `coinbase_tx_prefix ‖ its extranonce_prefix ‖
//! coinbase_tx_suffix`. Only connections whose `SetupConnection` did not set
//! `REQUIRES_STANDARD_JOBS` may be sent group jobs or `SetGroupChannel`.
//!
//! The rules gridproxy follows:
//!
//! - Only standard channels of connections without `REQUIRES_STANDARD_JOBS`
//!   are grouped. Extended channels (whose full extranonce is longer than a
//!   standard channel's prefix, so they may not share a group with them)
//!   and every channel of a `REQUIRES_STANDARD_JOBS` connection get their own
//!   jobs as before (`group_channel_id` 0 in their `Success`).
//! - One group per pool the connection's channels are routed to (and one
//!   for channels without a pool). Every member therefore derives its jobs
//!   from the same pool jobs; each keeps its own extranonce prefix (its miner
//!   part) and its own target (`SetTarget` stays per channel). The group
//!   job's suffix carries the zero padding after the miner part, the same
//!   length for every member (the miner part's length is fixed for the
//!   proxy's life).
//! - A channel whose pool changes is moved with `SetGroupChannel` before any
//!   job of its new group reaches it.
//! - Job ids come from one counter per connection, so no id is reused on a
//!   channel when it moves between groups; the channel's core relabels its
//!   job with the id the group gave it.
//! - A member is *synced* when its miner holds the group's last job on the
//!   group's tip. A pool job the group has not sent yet goes out once, to the
//!   group; as a future job with `SetNewPrevHash` when the core calls it
//!   clean, the tip changed, or some member is not synced (a non-future job
//!   would use that member's unknown tip), after which every member is
//!   synced. A member that is not synced and asks for the group's last job
//!   (a channel that just opened or moved) gets it alone: `NewMiningJob`
//!   (future, its own merkle root) and `SetNewPrevHash` on its channel id.
//! - The caller sends what [`Groups::update`] returns in order, under the
//!   same lock, so the miner sees membership and jobs in the order decided.
//!
//! Bounds: one entry per grouped channel (at most the connection's channel
//! limit) and one group per pool in use by them (a group is forgotten when
//! its last member leaves), each holding its last job only.

use super::channel::JobOut;
use crate::upstream::UpJob;
use gridproxy_protocol::difficulty::Target;
use std::collections::HashMap;
use std::sync::Arc;

/// What a group is keyed by: the pool its members are routed to (None: no pool).
pub type PoolKey = Option<usize>;

/// A message to write, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Send {
    /// `SetGroupChannel { group_channel_id: group, channel_ids: [channel] }`.
    SetGroup {
        /// The group channel id.
        group: u32,
        /// The channel moved into it.
        channel: u32,
    },
    /// `NewExtendedMiningJob` to the group (a future job when `clean`,
    /// followed by `SetNewPrevHash` to the group).
    GroupJob {
        /// The group channel id.
        group: u32,
        /// The job id.
        job_id: u32,
        /// Future job activated by `SetNewPrevHash`.
        clean: bool,
    },
    /// `NewMiningJob` (future) then `SetNewPrevHash`, both to this channel only.
    ChannelJob {
        /// The standard channel.
        channel: u32,
        /// The job id (the group's id for the same job).
        job_id: u32,
    },
}

/// The job a group sent last.
struct Sent {
    up: Arc<UpJob>,
    up_target: Target,
    job_id: u32,
}

impl Sent {
    fn is(&self, j: &JobOut) -> bool {
        Arc::ptr_eq(&self.up, &j.up) && self.up_target == j.up_target
    }
}

struct Group {
    id: u32,
    members: Vec<u32>,
    last: Option<Sent>,
}

struct Member {
    pool: PoolKey,
    synced: bool,
}

/// The groups of one connection (see the module docs).
pub struct Groups {
    next_id: u32,
    next_job: u32,
    groups: HashMap<PoolKey, Group>,
    members: HashMap<u32, Member>,
}

impl Default for Groups {
    fn default() -> Self {
        Self::new()
    }
}

impl Groups {
    /// No channels yet; ids start at 1.
    pub fn new() -> Self {
        Self {
            next_id: 1,
            next_job: 1,
            groups: HashMap::new(),
            members: HashMap::new(),
        }
    }

    /// A fresh channel or group id (one id space per connection).
    pub fn next_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    fn next_job(&mut self) -> u32 {
        let id = self.next_job;
        self.next_job = self.next_job.wrapping_add(1).max(1);
        id
    }

    /// Groups in use (for tests and logs).
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// The group channel id of `channel`, if it is a member.
    pub fn group_of(&self, channel: u32) -> Option<u32> {
        let m = self.members.get(&channel)?;
        self.groups.get(&m.pool).map(|g| g.id)
    }

    fn group_mut(&mut self, pool: PoolKey) -> &mut Group {
        if !self.groups.contains_key(&pool) {
            let id = self.next_id();
            self.groups.insert(
                pool,
                Group {
                    id,
                    members: Vec::new(),
                    last: None,
                },
            );
        }
        self.groups.get_mut(&pool).expect("inserted above")
    }

    fn remove_from_group(&mut self, channel: u32, pool: PoolKey) {
        if let Some(g) = self.groups.get_mut(&pool) {
            g.members.retain(|c| *c != channel);
            if g.members.is_empty() {
                self.groups.remove(&pool);
            }
        }
    }

    /// A new standard channel joins the group of `pool`; returns the group
    /// channel id for its `OpenStandardMiningChannel.Success`.
    pub fn join(&mut self, channel: u32, pool: PoolKey) -> u32 {
        if let Some(old) = self.members.remove(&channel) {
            self.remove_from_group(channel, old.pool);
        }
        let g = self.group_mut(pool);
        g.members.push(channel);
        let id = g.id;
        self.members.insert(
            channel,
            Member {
                pool,
                synced: false,
            },
        );
        id
    }

    /// The members of the group with channel id `group` (empty if there is none).
    pub fn members_of(&self, group: u32) -> Vec<u32> {
        self.groups
            .values()
            .find(|g| g.id == group)
            .map(|g| g.members.clone())
            .unwrap_or_default()
    }

    /// A channel closed: it leaves its group (an empty group is forgotten).
    pub fn leave(&mut self, channel: u32) {
        if let Some(m) = self.members.remove(&channel) {
            self.remove_from_group(channel, m.pool);
        }
    }

    /// `channel` (a member) is now routed to `pool` and its core may have a
    /// new job `job` (derived from that pool's job). Returns the id the job
    /// must carry (None when there is no job, or the channel is not a
    /// member) and what to send, in order.
    pub fn update(
        &mut self,
        channel: u32,
        pool: PoolKey,
        job: Option<&JobOut>,
    ) -> (Option<u32>, Vec<Send>) {
        let mut out = Vec::new();
        let Some(m) = self.members.get(&channel) else {
            return (None, out);
        };
        if m.pool != pool {
            // Moved: it joins the new pool's group, as a new channel does.
            let group = self.join(channel, pool);
            out.push(Send::SetGroup { group, channel });
        }
        let Some(j) = job else {
            return (None, out);
        };
        let synced = self.members[&channel].synced;
        let g = self.groups.get(&pool).expect("the member's group exists");
        if let Some(last) = g.last.as_ref().filter(|l| l.is(j)) {
            let job_id = last.job_id;
            if !synced {
                out.push(Send::ChannelJob { channel, job_id });
                self.members.get_mut(&channel).expect("member").synced = true;
            }
            return (Some(job_id), out);
        }
        let tip_moved = g
            .last
            .as_ref()
            .is_none_or(|l| l.up.prev_hash != j.up.prev_hash || l.up.nbits != j.up.nbits);
        let all_synced = g.members.iter().all(|c| self.members[c].synced);
        let clean = j.clean || tip_moved || !all_synced;
        let job_id = self.next_job();
        let g = self
            .groups
            .get_mut(&pool)
            .expect("the member's group exists");
        g.last = Some(Sent {
            up: j.up.clone(),
            up_target: j.up_target,
            job_id,
        });
        out.push(Send::GroupJob {
            group: g.id,
            job_id,
            clean,
        });
        if clean {
            for c in &g.members {
                if let Some(m) = self.members.get_mut(c) {
                    m.synced = true;
                }
            }
        }
        (Some(job_id), out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::UpJobId;

    fn up(prev: u8, clean: bool) -> Arc<UpJob> {
        Arc::new(UpJob {
            sv1_notify: Default::default(),
            id: UpJobId::Sv1(format!("{prev}")),
            version: 0x2000_0000,
            version_mask: 0x1fff_e000,
            prev_hash: [prev; 32],
            nbits: 0x1d00_ffff,
            ntime: 1_700_000_000,
            coinbase_prefix: vec![0xaa; 40],
            coinbase_suffix: vec![0xbb; 30],
            merkle_branch: vec![[3; 32]],
            clean,
            target: None,
        })
    }

    fn job(up: &Arc<UpJob>, clean: bool) -> JobOut {
        JobOut {
            id: 99,
            up: up.clone(),
            clean,
            difficulty: 1.0,
            target: Target::MAX,
            up_target: Target::MAX,
            version_mask: 0x1fff_e000,
            coinbase_suffix: vec![0; 3],
            merkle_root: Some([7; 32]),
            fanout_from: None,
        }
    }

    /// Twenty channels on one pool: the first gets the job as the group's,
    /// the later ones (joined after it went out) each get it alone; a new
    /// block then goes out once, to the group, and reaches every member.
    #[test]
    fn one_group_job_per_block_for_twenty_channels() {
        let mut g = Groups::new();
        let ids: Vec<u32> = (0..20).map(|_| g.next_id()).collect();
        let u1 = up(1, true);
        let mut group = None;
        let mut first_id = None;
        for (k, &c) in ids.iter().enumerate() {
            let gid = g.join(c, Some(0));
            assert!(group.is_none_or(|x| x == gid), "one group for one pool");
            assert!(!ids.contains(&gid), "group ids share the channel id space");
            group = Some(gid);
            let (id, out) = g.update(c, Some(0), Some(&job(&u1, true)));
            let id = id.unwrap();
            if k == 0 {
                assert_eq!(
                    out,
                    vec![Send::GroupJob {
                        group: gid,
                        job_id: id,
                        clean: true
                    }]
                );
                first_id = Some(id);
            } else {
                assert_eq!(id, first_id.unwrap(), "the same job keeps its id");
                assert_eq!(
                    out,
                    vec![Send::ChannelJob {
                        channel: c,
                        job_id: id
                    }]
                );
            }
        }
        let gid = group.unwrap();
        assert_eq!(g.group_count(), 1);
        // A new block: the first member to see it sends it to the group once.
        let u2 = up(2, true);
        let mut sends = vec![];
        let mut job_ids = vec![];
        for &c in &ids {
            let (id, out) = g.update(c, Some(0), Some(&job(&u2, true)));
            job_ids.push(id.unwrap());
            sends.extend(out);
        }
        assert_eq!(
            sends,
            vec![Send::GroupJob {
                group: gid,
                job_id: job_ids[0],
                clean: true
            }]
        );
        assert!(job_ids.iter().all(|&i| i == job_ids[0]));
        assert_ne!(job_ids[0], first_id.unwrap());
        // A job on the same tip: one non-future group job.
        let u3 = up(2, false);
        let mut sends = vec![];
        for &c in &ids {
            sends.extend(g.update(c, Some(0), Some(&job(&u3, false))).1);
        }
        assert!(matches!(sends[..], [Send::GroupJob { clean: false, .. }]));
    }

    /// A channel routed to another pool is moved to that pool's group before
    /// it gets a job there, and gets the group's current job alone; the old
    /// group is forgotten with its last member.
    #[test]
    fn a_channel_that_changes_pool_changes_group_first() {
        let mut g = Groups::new();
        let (a, b) = (g.next_id(), g.next_id());
        let ga = g.join(a, Some(0));
        let gb = g.join(b, Some(1));
        assert_ne!(ga, gb);
        let (p0, p1) = (up(1, true), up(9, true));
        let (ia, _) = g.update(a, Some(0), Some(&job(&p0, true)));
        let (ib, out) = g.update(b, Some(1), Some(&job(&p1, true)));
        assert!(matches!(out[..], [Send::GroupJob { clean: true, .. }]));
        // `a` moves to pool 1: SetGroupChannel, then pool 1's job on its channel.
        let (id, out) = g.update(a, Some(1), Some(&job(&p1, true)));
        assert_eq!(id, ib);
        assert_ne!(id, ia);
        assert_eq!(
            out,
            vec![
                Send::SetGroup {
                    group: gb,
                    channel: a
                },
                Send::ChannelJob {
                    channel: a,
                    job_id: ib.unwrap()
                }
            ]
        );
        assert_eq!(g.group_of(a), Some(gb));
        assert_eq!(g.group_count(), 1, "the empty group is forgotten");
        // A parked channel (no pool) leaves the group without a job.
        let (id, out) = g.update(b, None, None);
        assert_eq!(id, None);
        assert!(matches!(out[..], [Send::SetGroup { channel, .. }] if channel == b));
        assert_ne!(g.group_of(b), Some(gb));
        g.leave(a);
        g.leave(b);
        assert_eq!(g.group_count(), 0);
    }

    /// A pool job the group has not sent, asked for by a member that is not
    /// synced (it just opened, the others are ahead of it), goes to the group
    /// as a future job with SetNewPrevHash even on the same tip: a
    /// non-future job would use that member's unknown tip.
    #[test]
    fn a_member_out_of_step_makes_the_group_job_clean() {
        let mut g = Groups::new();
        let (a, b) = (g.next_id(), g.next_id());
        g.join(a, Some(0));
        let u1 = up(1, true);
        g.update(a, Some(0), Some(&job(&u1, true)));
        // `b` opens while no job is live for it (its core had none yet).
        g.join(b, Some(0));
        assert_eq!(g.update(b, Some(0), None), (None, vec![]));
        // A same-tip job seen first by `a`: clean, because `b` is not synced.
        let u2 = up(1, false);
        let (_, out) = g.update(a, Some(0), Some(&job(&u2, false)));
        assert!(matches!(out[..], [Send::GroupJob { clean: true, .. }]));
        // Now `b` has it through the group.
        assert_eq!(g.update(b, Some(0), Some(&job(&u2, true))).1, vec![]);
        // The next same-tip job is not clean.
        let u3 = up(1, false);
        let (_, out) = g.update(b, Some(0), Some(&job(&u3, false)));
        assert!(matches!(out[..], [Send::GroupJob { clean: false, .. }]));
    }

    /// The same pool job with another pool target is another job (its
    /// shares are judged differently), so it gets a new id.
    #[test]
    fn a_new_pool_target_is_a_new_group_job() {
        let mut g = Groups::new();
        let a = g.next_id();
        g.join(a, Some(0));
        let u1 = up(1, true);
        let (i1, _) = g.update(a, Some(0), Some(&job(&u1, true)));
        let mut j = job(&u1, false);
        j.up_target = Target::from_difficulty(2.0);
        let (i2, out) = g.update(a, Some(0), Some(&j));
        assert_ne!(i1, i2);
        assert!(matches!(out[..], [Send::GroupJob { clean: false, .. }]));
    }

    #[test]
    fn channels_that_are_not_members_are_left_alone() {
        let mut g = Groups::new();
        let u1 = up(1, true);
        assert_eq!(g.update(5, Some(0), Some(&job(&u1, true))), (None, vec![]));
        assert_eq!(g.group_count(), 0);
    }
}
