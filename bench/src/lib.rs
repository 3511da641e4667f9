//! Peers for `bench/run.py`: `bench-upstream` (HTTP/1.1, h2c and gRPC unary answers) and
//! `bare-forwarder`, the least a hyper-based proxy can do, as the floor ferry is
//! measured against. Not part of ferry.
