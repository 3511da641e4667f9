//! ferry-telemetry
