//! The command line's library side: how `check` and `scan` reach a registry as a person's
//! tools do, and how they say what happened. Nothing below `cli` names it: the scanner takes
//! its credentials through [`crate::scan::ScanAuth`], the tree walk is [`crate::inspect`].

pub mod access;
pub mod check;
pub mod credentials;
pub mod heal;
pub mod reference;
pub mod scan;
