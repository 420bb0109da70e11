//! Hostile and broken input.
//!
//! - The data plane: thousands of random and mutated frames (from the seed corpus of
//!   lb-common/fuzz) through BPF_PROG_TEST_RUN, each checked against the invariants: never
//!   XDP_ABORTED; counted under exactly one reason; traffic for neither a VIP nor this
//!   node passed untouched; no output longer than the input plus 72 bytes; the reason one
//!   the host model (`lb_common::packet`) allows; and what the program sends or accepts
//!   read back and compared with the input.
//! - The agent: over-limit configs and commands refused with their reasons and changing
//!   nothing; the API refusing non-root peers; metrics read-only; health-check targets
//!   that hang, refuse or answer garbage; SIGKILL leaving forwarding in place.

mod agent;
mod configs;
mod packets;
