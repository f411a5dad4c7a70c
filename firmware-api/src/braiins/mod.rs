//! Braiins OS gRPC API, package `braiins.bos.v1` (port 50051 on real
//! miners): the messages, the tonic clients (`*_service_client`) and the
//! tonic servers (`*_service_server`), generated once for both sides.
//!
//! # Source: the vendor's own `.proto` files
//!
//! `pb.rs` (beside this file) is generated from the vendor's public API
//! definitions, <https://github.com/braiins/bos-plus-api> at commit
//! `efa32c749a4a698fa87688e085ef69ff3b268601` (API 1.11.0, Braiins OS 26.05):
//! `proto/bos/v1/authentication.proto`, `actions.proto`, `performance.proto`
//! and `miner.proto`, with what they import (`common.proto`, `units.proto`,
//! `work.proto`, `pool.proto`, `cooling.proto`, `constraints.proto` and the
//! google.protobuf well-known types; only the messages reached below are
//! kept). Field numbers, names, types and enum values are the vendor's,
//! unchanged; `tests/braiins_wire.rs` pins them against hand-encoded bytes.
//!
//! Only these methods are generated, with every message and enum they reach
//! (each with all of its vendor fields):
//! - `AuthenticationService.Login`
//! - `ActionsService.PauseMining`, `ResumeMining`
//! - `PerformanceService.SetPowerTarget`
//! - `MinerService.GetMinerDetails`, `GetMinerStats`
//!
//! # Licence
//!
//! The vendor's `.proto` files are GPL-3.0-or-later ("Braiins Open-Source
//! Initiative", Copyright (C) 2023 Braiins Systems s.r.o.; the repository has
//! no separate licence file, each file carries that header). That is not a
//! permissive licence, and gridproxy is MIT OR Apache-2.0, so the `.proto`
//! files are **not** copied into this repository. `pb.rs` is generated from
//! them, keeping only the declarations listed above and none of the vendor's
//! comments. Whether generated interface code of this kind is a derivative
//! work under the GPL has not been settled here: review it before
//! distributing gridproxy binaries.
//!
//! # Regenerating
//!
//! `firmware-api/codegen` (its own workspace, run by hand; protox and
//! tonic-prost-build 0.14, `build_client(true)`, `build_server(true)`, no
//! `protoc`) reads a checkout of the vendor repository at the pinned commit,
//! prunes it as above and writes or checks `pb.rs`:
//!
//! ```text
//! git clone https://github.com/braiins/bos-plus-api /tmp/bos-plus-api
//! git -C /tmp/bos-plus-api checkout efa32c749a4a698fa87688e085ef69ff3b268601
//! cd firmware-api/codegen && cargo run -- /tmp/bos-plus-api          # check
//! cd firmware-api/codegen && cargo run -- /tmp/bos-plus-api --write  # rewrite
//! BOS_PLUS_API=/tmp/bos-plus-api cargo test  # (in codegen/) the check as a test
//! ```
//!
//! # What the vendor files say, and what they leave open
//!
//! - Login: `LoginResponse.token` (field 1) and `timeout_s` (2) exist since
//!   API 1.1.0 (the vendor's CHANGELOG); before that the token was only in
//!   the `authorization` response header, which the vendor's README says
//!   still works. Later calls send it as `authorization` metadata (README).
//!   The gRPC status a wrong password gets is not documented.
//! - `GetMinerStatsResponse` has `pool_stats` (1), `miner_stats` (2,
//!   `WorkSolverStats`, whose `real_hashrate` is a `RealHashrate` of
//!   `GigaHashrate` windows) and `power_stats` (3, `MinerPowerStats`). It has
//!   no mining status and no power target (those are elsewhere:
//!   `GetMinerDetailsResponse.status`, and the tuner state, not generated).

#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod pb;

pub use pb::*;
