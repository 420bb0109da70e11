//! The node of the seed corpus (lb-common/fuzz/corpus/classify), the fuzz target and
//! the data-plane tests that replay the corpus: its addresses, GUE port and services.

use super::{NodeView, ServiceAddr};
use crate::{
    addr::v4_mapped,
    proto::{IPPROTO_TCP, IPPROTO_UDP},
};

pub const NODE_V4: [u8; 4] = [10, 0, 0, 1];
/// fd00::1
pub const NODE_V6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const GUE_PORT: u16 = crate::encap::DEFAULT_GUE_PORT;
pub const VIP_V4: [u8; 4] = [192, 0, 2, 10];
/// 2001:db8::10
pub const VIP_V6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
/// An LB node that sends GUE to this one.
pub const PEER_V4: [u8; 4] = [10, 0, 0, 5];
/// fd00::5
pub const PEER_V6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
pub const CLIENT_V4: [u8; 4] = [198, 51, 100, 7];
/// 2001:db8:1::7
pub const CLIENT_V6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
/// An address that is neither a VIP nor the node.
pub const OTHER_V4: [u8; 4] = [203, 0, 113, 1];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x09];

/// (VIP, port, protocol) of every service.
pub const SERVICES: [ServiceAddr; 5] = [
    ServiceAddr {
        vip: v4_mapped(VIP_V4),
        port: 80,
        proto: IPPROTO_TCP,
    },
    ServiceAddr {
        vip: v4_mapped(VIP_V4),
        port: 53,
        proto: IPPROTO_UDP,
    },
    ServiceAddr {
        vip: VIP_V6,
        port: 80,
        proto: IPPROTO_TCP,
    },
    ServiceAddr {
        vip: VIP_V6,
        port: 53,
        proto: IPPROTO_UDP,
    },
    ServiceAddr {
        vip: v4_mapped(VIP_V4),
        port: 8080,
        proto: IPPROTO_TCP,
    },
];

pub const NODE: NodeView<'static> = NodeView {
    configured: true,
    addr_v4: NODE_V4,
    addr_v6: NODE_V6,
    gue_port: GUE_PORT,
    services: &SERVICES,
};
