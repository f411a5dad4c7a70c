//! Stratum V2 transport helpers (owned by the SV2 work).
