//! Golden bytes: the generated Braiins OS types against protobuf encodings
//! written out here by hand, from the vendor's field numbers.
//!
//! Every field number below was read from the vendor's `.proto` files,
//! github.com/braiins/bos-plus-api at commit
//! efa32c749a4a698fa87688e085ef69ff3b268601 (cited as `file:line`, under
//! `proto/bos/v1/`), and every byte is built by the protobuf wire rules
//! (a key is `field_number << 3 | wire_type`; varints little-endian base 128;
//! length-delimited is a varint length then the bytes; `double` is 8 bytes
//! little-endian). Neither the emulator nor the client can make these pass:
//! a field number, wire type or enum value that differs from the vendor's
//! fails them.

use gridproxy_firmware_api::braiins as pb;
use prost::Message;

const VARINT: u64 = 0;
const I64: u64 = 1;
const LEN: u64 = 2;

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

fn key(field: u64, wire_type: u64) -> Vec<u8> {
    varint(field << 3 | wire_type)
}

fn uint(field: u64, v: u64) -> Vec<u8> {
    [key(field, VARINT), varint(v)].concat()
}

fn double(field: u64, v: f64) -> Vec<u8> {
    [key(field, I64), v.to_le_bytes().to_vec()].concat()
}

fn bytes(field: u64, b: &[u8]) -> Vec<u8> {
    [key(field, LEN), varint(b.len() as u64), b.to_vec()].concat()
}

/// Both ways: the value encodes to exactly `wire`, and `wire` decodes to it.
fn golden<M: Message + Default + PartialEq + std::fmt::Debug>(value: &M, wire: &[u8]) {
    assert_eq!(value.encode_to_vec(), wire, "encoding of {value:?}");
    assert_eq!(&M::decode(wire).expect("decodes"), value);
}

#[test]
fn the_helpers_follow_the_wire_rules() {
    // The protobuf encoding guide's own examples: 150 in field 1 is
    // 08 96 01; "testing" in field 2 is 12 07 74 65 73 74 69 6e 67.
    assert_eq!(uint(1, 150), [0x08, 0x96, 0x01]);
    assert_eq!(
        bytes(2, b"testing"),
        [0x12, 0x07, 0x74, 0x65, 0x73, 0x74, 0x69, 0x6e, 0x67]
    );
    assert_eq!(double(1, 1.0), [0x09, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f]);
}

#[test]
fn login_request_and_response() {
    // authentication.proto:31 `string username = 1;`
    // authentication.proto:32 `string password = 2;`
    let wire = [bytes(1, b"root"), bytes(2, b"s3cret")].concat();
    golden(
        &pb::LoginRequest {
            username: "root".into(),
            password: "s3cret".into(),
        },
        &wire,
    );
    // authentication.proto:38 `string token = 1;`
    // authentication.proto:41 `uint32 timeout_s = 2;`
    let wire = [bytes(1, b"eUInGZBQ4yGyKiDe"), uint(2, 3600)].concat();
    golden(
        &pb::LoginResponse {
            token: "eUInGZBQ4yGyKiDe".into(),
            timeout_s: 3600,
        },
        &wire,
    );
}

#[test]
fn set_power_target_request_and_response() {
    // performance.proto:245 `braiins.bos.v1.SaveAction save_action = 1;`
    // performance.proto:247 `braiins.bos.v1.Power power_target = 2;`
    // common.proto:33 `SAVE_ACTION_SAVE_AND_APPLY = 2;`
    // units.proto:50 `uint64 watt = 1;` (in `message Power`)
    let power = uint(1, 2500);
    let wire = [uint(1, 2), bytes(2, &power)].concat();
    // Written out once in full, in case the helpers were wrong too:
    // 08 02 | 12 03 | 08 c4 13 (2500 = 0x9c4 = 0x44 + 0x13 << 7).
    assert_eq!(wire, [0x08, 0x02, 0x12, 0x03, 0x08, 0xc4, 0x13]);
    golden(
        &pb::SetPowerTargetRequest {
            save_action: pb::SaveAction::SaveAndApply as i32,
            power_target: Some(pb::Power { watt: 2500 }),
        },
        &wire,
    );
    // performance.proto:269 `braiins.bos.v1.Power power_target = 1;`
    golden(
        &pb::SetPowerTargetResponse {
            power_target: Some(pb::Power { watt: 2500 }),
        },
        &bytes(1, &power),
    );
}

#[test]
fn save_action_values() {
    // common.proto:31-34
    assert_eq!(pb::SaveAction::Unspecified as i32, 0);
    assert_eq!(pb::SaveAction::Save as i32, 1);
    assert_eq!(pb::SaveAction::SaveAndApply as i32, 2);
    assert_eq!(pb::SaveAction::SaveAndForceApply as i32, 3);
}

#[test]
fn pause_and_resume_responses() {
    // actions.proto:74 `bool already_paused = 1;`
    golden(
        &pb::PauseMiningResponse {
            already_paused: true,
        },
        &uint(1, 1),
    );
    // actions.proto:83 `bool already_mining = 1;`
    golden(
        &pb::ResumeMiningResponse {
            already_mining: true,
        },
        &uint(1, 1),
    );
    // actions.proto:69 and :78: both requests are empty messages.
    golden(&pb::PauseMiningRequest {}, &[]);
    golden(&pb::ResumeMiningRequest {}, &[]);
}

#[test]
fn miner_stats_with_nested_real_hashrate_and_power() {
    // units.proto:34 `double gigahash_per_second = 1;` (in `GigaHashrate`)
    let gh = |v: f64| double(1, v);
    // work.proto:33 `GigaHashrate last_5s = 1;`, :36 `last_1m = 4;`
    let real = [bytes(1, &gh(104_000.5)), bytes(4, &gh(103_900.0))].concat();
    // work.proto:48 `RealHashrate real_hashrate = 1;`
    // work.proto:50 `GigaHashrate nominal_hashrate = 2;`
    let solver = [bytes(1, &real), bytes(2, &gh(104_000.0))].concat();
    // units.proto:54 `double joule_per_terahash = 1;` (in `PowerEfficiency`)
    // miner.proto:205 `Power approximated_consumption = 1;`
    // miner.proto:207 `PowerEfficiency efficiency = 2;`
    let power = [bytes(1, &uint(1, 3068)), bytes(2, &double(1, 29.5))].concat();
    // pool.proto:115 `uint64 accepted_shares = 1;` (in `PoolStats`)
    let pool = uint(1, 42);
    // miner.proto:214 `PoolStats pool_stats = 1;`
    // miner.proto:216 `WorkSolverStats miner_stats = 2;`
    // miner.proto:218 `MinerPowerStats power_stats = 3;`
    let wire = [bytes(1, &pool), bytes(2, &solver), bytes(3, &power)].concat();

    let giga = |v| {
        Some(pb::GigaHashrate {
            gigahash_per_second: v,
        })
    };
    let stats = pb::GetMinerStatsResponse {
        pool_stats: Some(pb::PoolStats {
            accepted_shares: 42,
            ..Default::default()
        }),
        miner_stats: Some(pb::WorkSolverStats {
            real_hashrate: Some(pb::RealHashrate {
                last_5s: giga(104_000.5),
                last_1m: giga(103_900.0),
                ..Default::default()
            }),
            nominal_hashrate: giga(104_000.0),
            ..Default::default()
        }),
        power_stats: Some(pb::MinerPowerStats {
            approximated_consumption: Some(pb::Power { watt: 3068 }),
            efficiency: Some(pb::PowerEfficiency {
                joule_per_terahash: 29.5,
            }),
        }),
    };
    golden(&stats, &wire);
}

#[test]
fn miner_details_status() {
    // miner.proto:192 `MinerStatus status = 12;`
    // miner.proto:120-121 `MINER_STATUS_NORMAL = 2;` `MINER_STATUS_PAUSED = 3;`
    let wire = uint(12, 3);
    assert_eq!(wire, [0x60, 0x03]);
    golden(
        &pb::GetMinerDetailsResponse {
            status: pb::MinerStatus::Paused as i32,
            ..Default::default()
        },
        &wire,
    );
    assert_eq!(pb::MinerStatus::Normal as i32, 2);
}
