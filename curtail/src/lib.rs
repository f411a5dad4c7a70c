//! gridproxy-curtail: grid signals, the pure policy engine, actuators and the ledger.
