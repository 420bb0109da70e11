//! Why the XDP program did what it did: one per-CPU counter per reason in `REASON_STATS`.
//! Every packet the program sees ends in exactly one reason (docs/counters.md).

/// The outcome of one packet. The discriminant is the index in `REASON_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): passed untouched.
    PassNotIp = 0,
    /// IP, but not to a configured service nor GUE to this node: passed untouched.
    PassNotService,
    /// The node is not configured yet: passed untouched.
    PassUnconfigured,
    /// Too short or broken to tell whether it is for lb (no readable IP header): passed
    /// to the stack, which drops what it cannot use.
    PassUnparsed,
    /// Headers cut short or inconsistent, in a packet to a VIP or to the GUE port: dropped.
    DropMalformed,
    /// An IPv4 fragment to a VIP: dropped (its ports are unknown, so its backend is too).
    DropFragment,
    /// Would exceed the egress MTU once encapsulated: dropped.
    DropTooBig,
    /// The service's bucket has no backend: dropped.
    DropNoBackend,
    /// No route or neighbour to the next hop: dropped.
    DropFibMiss,
    /// This node has no address of the family the outer header needs: dropped.
    DropNoSource,
    /// Forwarded, encapsulated, to the bucket's first backend.
    Encapsulated,
    /// An ICMP "fragmentation needed" / ICMPv6 "packet too big" for a VIP, forwarded to
    /// the backend owning the quoted flow.
    IcmpForwarded,
    /// GUE received and accepted: a SYN (new connection).
    AcceptSyn,
    /// GUE received and accepted: a local socket owns the flow.
    AcceptSocket,
    /// GUE received and accepted: no hops left (the stack answers for itself).
    AcceptLastHop,
    /// GUE received, not ours, passed on to the next hop (daisy chaining).
    SecondHop,
    /// GUE to this node's port that is not lb's format: dropped.
    DropBadGue,
    /// GUE received by chaining, UDP, no connected socket here and no hop left: sent back
    /// to the first hop, which owns the bucket and so takes new UDP flows.
    ReturnedToFirstHop,
    /// GUE received and accepted: sent back by the last hop (see `ReturnedToFirstHop`).
    AcceptReturned,
    /// To a VIP, the bucket's first hop is this node, and the packet is this node's (a
    /// SYN, a flow a local socket owns, or no second hop to ask): passed to the local
    /// stack untouched, never encapsulated to the node itself.
    DeliveredLocally,
    /// To a VIP, the bucket's first hop is this node but no local socket owns the flow:
    /// encapsulated to the bucket's second hop, chained, as a first hop passes it on.
    SentOnFromLocal,
    /// Too big once encapsulated (IPv4 with DF, or IPv6): answered with ICMP
    /// "fragmentation needed" / ICMPv6 "packet too big" carrying the MTU that fits.
    IcmpTooBigSent,
    /// Not an outcome, counted besides the packet's own reason: the next hop came from
    /// `bpf_fib_lookup` because the agent's entry for it was missing or not resolved.
    FibFallback,
}

impl Reason {
    pub const COUNT: usize = 23;

    pub const ALL: [Reason; Reason::COUNT] = [
        Reason::PassNotIp,
        Reason::PassNotService,
        Reason::PassUnconfigured,
        Reason::PassUnparsed,
        Reason::DropMalformed,
        Reason::DropFragment,
        Reason::DropTooBig,
        Reason::DropNoBackend,
        Reason::DropFibMiss,
        Reason::DropNoSource,
        Reason::Encapsulated,
        Reason::IcmpForwarded,
        Reason::AcceptSyn,
        Reason::AcceptSocket,
        Reason::AcceptLastHop,
        Reason::SecondHop,
        Reason::DropBadGue,
        Reason::ReturnedToFirstHop,
        Reason::AcceptReturned,
        Reason::DeliveredLocally,
        Reason::SentOnFromLocal,
        Reason::IcmpTooBigSent,
        Reason::FibFallback,
    ];

    /// The metric label of the reason.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotService => "pass_not_service",
            Reason::PassUnconfigured => "pass_unconfigured",
            Reason::PassUnparsed => "pass_unparsed",
            Reason::DropMalformed => "drop_malformed",
            Reason::DropFragment => "drop_fragment",
            Reason::DropTooBig => "drop_too_big",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropFibMiss => "drop_fib_miss",
            Reason::DropNoSource => "drop_no_source",
            Reason::Encapsulated => "encapsulated",
            Reason::IcmpForwarded => "icmp_forwarded",
            Reason::AcceptSyn => "accept_syn",
            Reason::AcceptSocket => "accept_socket",
            Reason::AcceptLastHop => "accept_last_hop",
            Reason::SecondHop => "second_hop",
            Reason::DropBadGue => "drop_bad_gue",
            Reason::ReturnedToFirstHop => "returned_to_first_hop",
            Reason::AcceptReturned => "accept_returned",
            Reason::DeliveredLocally => "delivered_locally",
            Reason::SentOnFromLocal => "sent_on_from_local",
            Reason::IcmpTooBigSent => "icmp_too_big_sent",
            Reason::FibFallback => "fib_fallback",
        }
    }

    /// Whether the reason is a packet's outcome (each packet has exactly one), rather
    /// than an event counted besides it.
    pub const fn is_outcome(self) -> bool {
        !matches!(self, Reason::FibFallback)
    }
}

#[cfg(test)]
mod tests {
    use super::Reason;

    #[test]
    fn all_is_complete_and_ordered() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{}", r.name());
        }
    }
}
