//! An index in front of a hash map: an array of slots the XDP program searches with a few
//! inlined array reads instead of a hash-map helper call (in this kernel the lookup and
//! the functions under it each return through the return thunk, about 9 ns apiece on the
//! benchmark machine). The service index (`service_index`) and the next-hop index
//! (`nexthop_index`) are two of them; the pair index (`pair_index`) keeps the same slot
//! states and write order.
//!
//! Open addressing: a key lives in one of `PROBES` slots from its home slot on, before the
//! first empty one. A reader stops at an empty slot (no such key) or at the key; when all
//! `PROBES` slots are taken by other keys or removed ones, it asks the hash map, which
//! always holds every key. Userspace keeps the index (lb-userspace's `open_index`), with
//! writes that readers never see half done:
//! - a slot's bytes change only while it is not `VALID`; making it `VALID` or `REMOVED`
//!   changes its state alone;
//! - a slot never becomes `EMPTY` again, so an empty slot always ends a search correctly.

/// A slot's state: never used; ends a search.
pub const EMPTY: u8 = 0;
/// Holds a live key.
pub const VALID: u8 = 1;
/// Held a key that was removed or moved to another slot; a search goes on past it.
pub const REMOVED: u8 = 2;

/// Odd constants for the indexes' multiplicative home hashes: 2^32 divided by the golden
/// ratio, and `fmix32`'s first multiplier, whose products spread every input bit over the
/// top bits.
pub const GOLDEN: u32 = 0x9e37_79b1;
pub const MIX: u32 = 0x85eb_ca6b;

/// A slot type: a key, its value and the state.
pub trait Slot: Copy {
    type Key: Copy + PartialEq;
    type Value: Copy + PartialEq;
    /// The key as words compared in one go (a reader compares these, not bytes).
    type Words: Copy + PartialEq;
    /// Slots of the index (a power of two).
    const SLOTS: u32;
    /// Slots a reader looks at before it asks the hash map.
    const PROBES: u32;

    fn words(key: &Self::Key) -> Self::Words;
    /// The slot's own key as words; a slot type may read them faster than `words`.
    #[inline(always)]
    fn key_words(&self) -> Self::Words {
        Self::words(self.key())
    }
    /// The key's home slot, below `SLOTS`.
    fn home(key: &Self::Key) -> u32;
    fn new(key: Self::Key, value: Self::Value, state: u8) -> Self;
    fn key(&self) -> &Self::Key;
    fn value(&self) -> &Self::Value;
    fn state(&self) -> u8;
}

/// The slots a search for `key` may look at, in order.
#[inline(always)]
pub fn window<S: Slot>(key: &S::Key) -> impl Iterator<Item = u32> {
    window_at::<S>(S::home(key))
}

/// The slots a search from home slot `home` may look at, in order.
#[inline(always)]
fn window_at<S: Slot>(home: u32) -> impl Iterator<Item = u32> {
    (0..S::PROBES).map(move |i| (home + i) & (S::SLOTS - 1))
}

/// What an index says about a key.
#[derive(Debug, PartialEq, Eq)]
pub enum Probe<'a, V> {
    Found(&'a V),
    /// The hash map has no such key.
    Absent,
    /// The index cannot tell: ask the hash map.
    Unindexed,
}

/// Looks `key` up, reading slots with `slot` (the array's lookup).
#[inline(always)]
pub fn probe<'a, S: Slot + 'a>(
    key: &S::Key,
    slot: impl Fn(u32) -> Option<&'a S>,
) -> Probe<'a, S::Value> {
    probe_words(S::words(key), S::home(key), slot)
}

/// Looks up the key whose words are `want` and home slot `home` (for a caller that has
/// the words at hand, not the key).
#[inline(always)]
pub fn probe_words<'a, S: Slot + 'a>(
    want: S::Words,
    home: u32,
    slot: impl Fn(u32) -> Option<&'a S>,
) -> Probe<'a, S::Value> {
    for i in window_at::<S>(home) {
        let Some(s) = slot(i) else {
            return Probe::Unindexed;
        };
        if s.state() == EMPTY {
            return Probe::Absent;
        }
        if s.state() == VALID && s.key_words() == want {
            return Probe::Found(s.value());
        }
    }
    Probe::Unindexed
}
