//! Braiins OS gRPC API, package `braiins.bos.v1` (port 50051 on real
//! miners): the messages, the tonic clients (`*_service_client`) and the
//! tonic servers (`*_service_server`), generated once for both sides.
//!
//! `bos.proto` (beside this file) declares only the fields gridproxy uses;
//! its field numbers are our own and unconfirmed against the vendor's
//! protos (see its header). `pb.rs` is generated from it with `protox` +
//! `tonic-prost-build` 0.14 (`build_client(true)`, `build_server(true)`,
//! `compile_fds`) and checked in, so the build needs neither `protoc` nor a
//! build script. Regenerate it when the `.proto` changes.

#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod pb;

pub use pb::*;
