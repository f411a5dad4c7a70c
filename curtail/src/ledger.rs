//! ledger placeholder
