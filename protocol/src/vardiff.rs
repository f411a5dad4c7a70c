//! vardiff
