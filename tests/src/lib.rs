//! Shared harness for end-to-end tests: peer discovery, ports, process guards.
