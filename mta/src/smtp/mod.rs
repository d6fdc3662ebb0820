//! The SMTP protocol, pure: command parsing, replies, message content
//! framing and the server session state machine. Nothing here does I/O;
//! `crate::server` drives it over sockets.
//!
//! RFCs: 5321 (SMTP), 1870 (SIZE), 2920 (PIPELINING), 3030 (CHUNKING/BDAT),
//! 2034 and 3463 (enhanced status codes), 3207 (STARTTLS), 4954 (AUTH),
//! 4616 (PLAIN), 6152 (8BITMIME), 6531 (SMTPUTF8).

pub mod body;
pub mod command;
pub mod reply;
pub mod session;

pub use reply::{Reply, Status};
pub use session::{
    AuthOutcome, AuthRequest, Envelope, Event, Identity, Peer, Session, SessionConfig, Step,
    TlsInfo,
};
