//! ferry-admin
