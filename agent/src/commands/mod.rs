//! Subcommands that do work of their own rather than ask the agent over its socket.
pub mod generate;
pub mod off;
pub mod selftest;
pub mod suggest_cmd;
