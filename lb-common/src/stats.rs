//! Why the XDP program did what it did: one per-CPU counter per reason in `REASON_STATS`.
//! Every packet the program sees ends in exactly one reason (docs/counters.md).

/// Defines `Reason` from one list of variants with their metric labels: the enum (in list
/// order, so the discriminant is the index in `REASON_STATS`), `COUNT`, `ALL` and `name`.
macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)+) => {
        /// The outcome of one packet. The discriminant is the index in `REASON_STATS`.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Reason {
            $($(#[$doc])* $variant,)+
        }

        impl Reason {
            pub const COUNT: usize = [$(Reason::$variant),+].len();

            pub const ALL: [Reason; Reason::COUNT] = [$(Reason::$variant),+];

            /// The metric label of the reason.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Reason::$variant => $name,)+
                }
            }
        }
    };
}

reasons! {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): passed untouched.
    PassNotIp = "pass_not_ip",
    /// IP, but not to a configured service nor GUE to this node: passed untouched.
    PassNotService = "pass_not_service",
    /// The node is not configured yet: passed untouched.
    PassUnconfigured = "pass_unconfigured",
    /// Too short or broken to tell whether it is for lb (no readable IP header): passed
    /// to the stack, which drops what it cannot use.
    PassUnparsed = "pass_unparsed",
    /// Headers cut short or inconsistent, in a packet to a VIP or to the GUE port: dropped.
    DropMalformed = "drop_malformed",
    /// An IPv4 fragment to a VIP: dropped (its ports are unknown, so its backend is too).
    DropFragment = "drop_fragment",
    /// Would exceed the egress MTU once encapsulated: dropped.
    DropTooBig = "drop_too_big",
    /// The service's bucket has no backend: dropped.
    DropNoBackend = "drop_no_backend",
    /// No route or neighbour to the next hop: dropped.
    DropFibMiss = "drop_fib_miss",
    /// This node has no address of the family the outer header needs: dropped.
    DropNoSource = "drop_no_source",
    /// Forwarded, encapsulated, to the bucket's first backend.
    Encapsulated = "encapsulated",
    /// An ICMP "fragmentation needed" / ICMPv6 "packet too big" for a VIP, forwarded to
    /// the backend owning the quoted flow.
    IcmpForwarded = "icmp_forwarded",
    /// GUE received and accepted: a SYN (new connection).
    AcceptSyn = "accept_syn",
    /// GUE received and accepted: a local socket owns the flow.
    AcceptSocket = "accept_socket",
    /// GUE received and accepted: no hops left (the stack answers for itself).
    AcceptLastHop = "accept_last_hop",
    /// GUE received, not ours, passed on to the next hop (daisy chaining).
    SecondHop = "second_hop",
    /// GUE to this node's port that is not lb's format: dropped.
    DropBadGue = "drop_bad_gue",
    /// GUE received by chaining, UDP, no connected socket here and no hop left: sent back
    /// to the first hop, which owns the bucket and so takes new UDP flows.
    ReturnedToFirstHop = "returned_to_first_hop",
    /// GUE received and accepted: sent back by the last hop (see `ReturnedToFirstHop`).
    AcceptReturned = "accept_returned",
    /// To a VIP, the bucket's first hop is this node, and the packet is this node's (a
    /// SYN, a flow a local socket owns, or no second hop to ask): passed to the local
    /// stack untouched, never encapsulated to the node itself.
    DeliveredLocally = "delivered_locally",
    /// To a VIP, the bucket's first hop is this node but no local socket owns the flow:
    /// encapsulated to the bucket's second hop, chained, as a first hop passes it on.
    SentOnFromLocal = "sent_on_from_local",
    /// Too big once encapsulated (IPv4 with DF, or IPv6): answered with ICMP
    /// "fragmentation needed" / ICMPv6 "packet too big" carrying the MTU that fits.
    IcmpTooBigSent = "icmp_too_big_sent",
    /// Not an outcome, counted besides the packet's own reason: the next hop came from
    /// `bpf_fib_lookup` because the agent's entry for it was missing or not resolved.
    FibFallback = "fib_fallback",
}

impl Reason {
    /// Whether the reason is a packet's outcome (each packet has exactly one), rather
    /// than an event counted besides it.
    pub const fn is_outcome(self) -> bool {
        !matches!(self, Reason::FibFallback)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::vec::Vec;

    use super::Reason;

    #[test]
    fn all_is_complete_and_ordered() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{}", r.name());
        }
    }

    /// docs/counters.md's table lists every reason by its label, and nothing else.
    #[test]
    fn counters_doc_lists_every_reason() {
        let doc = include_str!("../../docs/counters.md");
        let start = doc
            .find("| reason |")
            .expect("docs/counters.md has a reason table");
        let documented: Vec<&str> = doc[start..]
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .filter_map(|l| l.split('`').nth(1))
            .collect();
        for r in Reason::ALL {
            assert!(
                documented.contains(&r.name()),
                "docs/counters.md does not list `{}`",
                r.name()
            );
        }
        for d in &documented {
            assert!(
                Reason::ALL.iter().any(|r| r.name() == *d),
                "docs/counters.md lists `{d}`, which is no reason"
            );
        }
        assert_eq!(documented.len(), Reason::COUNT, "a reason listed twice");
    }
}
