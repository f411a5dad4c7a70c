//! difficulty
