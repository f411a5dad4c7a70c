//! Seed inputs for the fuzz targets that take binary messages, produced by
//! the project's own encoders (SV2 frames) and by prost (Braiins OS replies
//! in the shape the emulator sends).

use std::path::Path;

use gridproxy_curtail::actuators::braiins::pb;
use gridproxy_protocol::sv2::{
    common_messages_sv2::{Protocol, SetupConnectionOwned, SetupConnectionSuccess},
    mining_sv2::{
        NewMiningJobOwned, OpenExtendedMiningChannelOwned, OpenStandardMiningChannelOwned,
        OpenStandardMiningChannelSuccessOwned, SetNewPrevHashOwned, SetTargetOwned,
        SubmitSharesExtendedOwned, SubmitSharesStandard, SubmitSharesSuccess,
    },
    CommonMessagesOwned, Frame, Message, MiningOwned,
};
use prost::Message as _;

fn frame(m: Message) -> Vec<u8> {
    Frame::from_message(m).expect("encodes").to_plain().expect("plain")
}

fn sv2_messages() -> Vec<(&'static str, Message)> {
    let s = |t: &str| t.to_string().try_into().expect("short");
    let setup = SetupConnectionOwned {
        protocol: Protocol::MiningProtocol,
        min_version: 2,
        max_version: 2,
        flags: 0,
        endpoint_host: s("127.0.0.1"),
        endpoint_port: 34255,
        vendor: s("gridproxy-fixtures"),
        hardware_version: s("sv2-sim"),
        firmware: s("0.1.0"),
        device_id: s("sim-0"),
    };
    let target: [u8; 32] = {
        let mut t = [0u8; 32];
        t[28..].copy_from_slice(&[0xff, 0xff, 0x00, 0x00]);
        t
    };
    vec![
        ("setup_connection", Message::Common(CommonMessagesOwned::SetupConnection(setup))),
        (
            "setup_connection_success",
            Message::Common(CommonMessagesOwned::SetupConnectionSuccess(
                SetupConnectionSuccess { used_version: 2, flags: 0 },
            )),
        ),
        (
            "open_standard",
            Message::Mining(MiningOwned::OpenStandardMiningChannel(
                OpenStandardMiningChannelOwned {
                    request_id: 1,
                    user_identity: s("acct.worker1"),
                    nominal_hash_rate: 1.0e14,
                    max_target: [0xff; 32].into(),
                },
            )),
        ),
        (
            "open_extended",
            Message::Mining(MiningOwned::OpenExtendedMiningChannel(
                OpenExtendedMiningChannelOwned {
                    request_id: 2,
                    user_identity: s("acct.worker2"),
                    nominal_hash_rate: 1.0e14,
                    max_target: [0xff; 32].into(),
                    min_extranonce_size: 8,
                },
            )),
        ),
        (
            "open_standard_success",
            Message::Mining(MiningOwned::OpenStandardMiningChannelSuccess(
                OpenStandardMiningChannelSuccessOwned {
                    request_id: 1,
                    channel_id: 7,
                    target: target.into(),
                    extranonce_prefix: vec![0, 0, 0, 1].try_into().expect("short"),
                    group_channel_id: 1,
                },
            )),
        ),
        (
            "set_target",
            Message::Mining(MiningOwned::SetTarget(SetTargetOwned {
                channel_id: 7,
                maximum_target: target.into(),
            })),
        ),
        (
            "new_mining_job",
            Message::Mining(MiningOwned::NewMiningJob(NewMiningJobOwned {
                channel_id: 7,
                job_id: 3,
                min_ntime: gridproxy_protocol::sv2::binary_sv2::Sv2OptionOwned::new(Some(1_700_000_000)),
                version: 0x2000_0000,
                merkle_root: [0x5a; 32].into(),
            })),
        ),
        (
            "set_new_prev_hash",
            Message::Mining(MiningOwned::SetNewPrevHash(SetNewPrevHashOwned {
                channel_id: 7,
                job_id: 3,
                prev_hash: [0x11; 32].into(),
                min_ntime: 1_700_000_000,
                nbits: 0x170e_d0eb,
            })),
        ),
        (
            "submit_standard",
            Message::Mining(MiningOwned::SubmitSharesStandard(SubmitSharesStandard {
                channel_id: 7,
                sequence_number: 1,
                job_id: 3,
                nonce: 0xdead_beef,
                ntime: 1_700_000_000,
                version: 0x2000_0000,
            })),
        ),
        (
            "submit_extended",
            Message::Mining(MiningOwned::SubmitSharesExtended(SubmitSharesExtendedOwned {
                channel_id: 8,
                sequence_number: 2,
                job_id: 4,
                nonce: 0x0102_0304,
                ntime: 1_700_000_001,
                version: 0x2000_e000,
                extranonce: vec![1, 0, 0, 0, 0, 0, 0, 0].try_into().expect("short"),
            })),
        ),
        (
            "submit_success",
            Message::Mining(MiningOwned::SubmitSharesSuccess(SubmitSharesSuccess {
                channel_id: 7,
                last_sequence_number: 1,
                new_submits_accepted_count: 1,
                new_shares_sum: 1024,
            })),
        ),
    ]
}

fn main() {
    let out = std::env::args().nth(1).expect("usage: seedgen CORPUS_DIR");
    let out = Path::new(&out);
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(name), bytes).expect("write");
    };
    // sv2_frames: [noise flag][2 cut bytes] then frames.
    let msgs = sv2_messages();
    let mut conversation = vec![1u8, 0x10, 0x03];
    for (name, m) in msgs {
        let f = frame(m);
        let mut seed = vec![0u8, 0, 0];
        seed.extend_from_slice(&f);
        write("sv2_frames", name, &seed);
        conversation.extend_from_slice(&f);
    }
    write("sv2_frames", "conversation_noise", &conversation);

    // firmware_replies mode 4 (Braiins): [4][kind] then a protobuf message.
    let giga = |v: f64| {
        Some(pb::GigaHashrate {
            gigahash_per_second: v,
        })
    };
    let stats = pb::GetMinerStatsResponse {
        power_stats: Some(pb::MinerPowerStats {
            approximated_consumption: Some(pb::Power { watt: 3250 }),
            efficiency: Some(pb::PowerEfficiency {
                joule_per_terahash: 34.0,
            }),
        }),
        miner_stats: Some(pb::WorkSolverStats {
            real_hashrate: Some(pb::RealHashrate {
                last_5s: giga(95_500.0),
                last_1m: giga(95_000.0),
                ..Default::default()
            }),
            nominal_hashrate: giga(104_000.0),
            ..Default::default()
        }),
        pool_stats: Some(pb::PoolStats {
            accepted_shares: 1200,
            ..Default::default()
        }),
    };
    let mut seed = vec![4u8, 0];
    seed.extend(stats.encode_to_vec());
    write("firmware_replies", "braiins_miner_stats", &seed);
    let login = pb::LoginResponse {
        token: "vWmTgJ6WbC4qjnYH".into(),
        timeout_s: 3600,
    };
    let mut seed = vec![4u8, 1];
    seed.extend(login.encode_to_vec());
    write("firmware_replies", "braiins_login", &seed);
    let target = pb::SetPowerTargetResponse {
        power_target: Some(pb::Power { watt: 2800 }),
    };
    let mut seed = vec![4u8, 2];
    seed.extend(target.encode_to_vec());
    write("firmware_replies", "braiins_set_power_target", &seed);
    let paused = pb::PauseMiningResponse {
        already_paused: true,
    };
    let mut seed = vec![4u8, 3];
    seed.extend(paused.encode_to_vec());
    write("firmware_replies", "braiins_pause", &seed);
}
