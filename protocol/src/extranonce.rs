//! extranonce
