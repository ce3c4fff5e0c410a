//! The two guards, agent side. The kernel counts and decides; here its decisions become holds,
//! refusals, messages and incidents, and admin verbs (approve, deny, confirm) become kernel state.
pub mod deletion;
pub mod shutdown;
pub mod tell;
