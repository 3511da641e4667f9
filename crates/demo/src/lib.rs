//! ferry-demo
