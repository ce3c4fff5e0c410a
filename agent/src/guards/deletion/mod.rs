//! The deletion guard, agent side: its decisions on the kernel's crossings, kills and refusals
//! ([`holds`]), the admin verbs on held jobs ([`admin`]), what an approval grants ([`approval`]), how a crossing of a
//! budget above the job is worded ([`levels`]), and job summaries and their replay ([`replay`]).
pub mod admin;
pub mod approval;
pub mod holds;
pub mod levels;
pub mod replay;
