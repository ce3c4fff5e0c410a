//! The admin interface: the socket's protocol ([`ipc`]), its server ([`server`]: credentials,
//! limits, one thread per client), and `guardrail status` when no agent answers ([`offline`]).
pub mod ipc;
pub mod offline;
pub mod server;
