//! ferry-init
