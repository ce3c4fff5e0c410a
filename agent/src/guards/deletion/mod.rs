//! The deletion guard, agent side: what an approval grants ([`approval`]), how a crossing of a
//! budget above the job is worded ([`levels`]), and job summaries and their replay ([`replay`]).
pub mod approval;
pub mod levels;
pub mod replay;
