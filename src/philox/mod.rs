//! Philox4x32-10, the counter-based generator behind every random decision in fusedreg.
//!
//! The same function is implemented in `kernels/common/philox.cuh`; both reproduce the Random123
//! known-answer vectors, and a GPU test shows them equal on many random (counter, key) pairs.
//!
//! # Keying: (seed, call id, 64-bit element index) -> 32-bit word
//!
//! Element `i` of a call takes word `i % 4` of one Philox block:
//!
//! ```text
//! counter = [lo32(i / 4), hi32(i / 4), lo32(call), hi32(call)]
//! key     = [lo32(seed),  hi32(seed)]
//! word(i) = philox4x32_10(counter, key)[i % 4]
//! ```
//!
//! The word is a pure function of (seed, call, i): it does not depend on the tensor's length,
//! the grid, the vector width, the alignment or the GPU model. Four consecutive elements share one
//! Philox evaluation, which is what lets a kernel produce eight bf16 masks with two evaluations.
//! The full 64-bit index is used, so tensors above 2^32 elements never repeat randomness.
//!
//! # Keep/drop by an integer compare
//!
//! The dropping ops ([`crate::dropping`]) turn a probability into an integer threshold once, on
//! the host ([`DropRate`]). An element is dropped when its word is *below* the threshold, so CPU
//! and GPU agree exactly and the drop probability actually applied is exactly `threshold / 2^32`.
//! This module is the generator only: it knows nothing of rates (the dependency runs one way,
//! `dropping` -> `philox`).
//!
//! ```
//! use fusedreg::dropping::DropRate;
//! use fusedreg::philox::{mask_word, philox4x32_10};
//! // Random123 known-answer vector: zero counter, zero key.
//! assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
//! let rate = DropRate::new(0.1).unwrap();
//! let kept = (0..10_000u64).filter(|&i| rate.keeps(mask_word(42, 7, i))).count();
//! assert!((8_800..9_200).contains(&kept));
//! ```
//!
//! [`DropRate`]: crate::dropping::DropRate

pub mod gpu;

/// First multiplier.
///
/// # Examples
///
/// One Philox4x32-10 written out with the public constants matches [`philox4x32_10`]:
///
/// ```
/// use fusedreg::philox::{philox4x32_10, M0, M1, W0, W1};
/// let (mut c, mut k) = ([1u32, 2, 3, 4], [5u32, 6]);
/// for round in 0..10 {
///     if round > 0 {
///         k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
///     }
///     let (p0, p1) = (u64::from(M0) * u64::from(c[0]), u64::from(M1) * u64::from(c[2]));
///     let (hi0, hi1) = ((p0 >> 32) as u32, (p1 >> 32) as u32);
///     c = [hi1 ^ c[1] ^ k[0], p1 as u32, hi0 ^ c[3] ^ k[1], p0 as u32];
/// }
/// assert_eq!(c, philox4x32_10([1, 2, 3, 4], [5, 6]));
/// ```
pub const M0: u32 = 0xD251_1F53;
/// Second multiplier.
///
/// # Examples
///
/// ```
/// use fusedreg::philox::{M0, M1};
/// // Both multipliers are odd, so multiplying a counter word by them is a bijection mod 2^32.
/// assert!(M0 % 2 == 1 && M1 % 2 == 1);
/// // A round uses the high and the low half of the 64-bit product.
/// let p = u64::from(M1) * u64::from(u32::MAX);
/// assert_eq!(((p >> 32) as u32, p as u32), (M1 - 1, M1.wrapping_neg()));
/// ```
pub const M1: u32 = 0xCD9E_8D57;
/// Key bump of word 0 (golden ratio).
///
/// # Examples
///
/// ```
/// use fusedreg::philox::W0;
/// // The fraction of the golden ratio in 32 bits: floor((sqrt(5) - 1) / 2 * 2^32).
/// assert_eq!(W0, ((5f64.sqrt() - 1.0) / 2.0 * 4_294_967_296.0) as u32);
/// ```
pub const W0: u32 = 0x9E37_79B9;
/// Key bump of word 1 (sqrt(3) - 1).
///
/// # Examples
///
/// ```
/// use fusedreg::philox::W1;
/// // floor((sqrt(3) - 1) * 2^32).
/// assert_eq!(W1, ((3f64.sqrt() - 1.0) * 4_294_967_296.0) as u32);
/// ```
pub const W1: u32 = 0xBB67_AE85;

/// One Philox round.
#[inline(always)]
fn round(c: [u32; 4], k: [u32; 2]) -> [u32; 4] {
    let p0 = u64::from(M0) * u64::from(c[0]);
    let p1 = u64::from(M1) * u64::from(c[2]);
    let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
    let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
    [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]
}

/// Philox4x32 with 10 rounds (the key is bumped before rounds 2..10).
///
/// ```
/// use fusedreg::philox::philox4x32_10;
/// assert_eq!(
///     philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
///     [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
/// );
/// ```
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    c = round(c, k);
    for _ in 1..10 {
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        c = round(c, k);
    }
    c
}

/// The Philox block holding the words of elements `4*block .. 4*block+4` of `(seed, call)`.
///
/// # Examples
///
/// ```
/// use fusedreg::philox::{block, mask_word, philox4x32_10};
/// let b = block(42, 7, 5);
/// // Counter [lo(block), hi(block), lo(call), hi(call)], key [lo(seed), hi(seed)].
/// assert_eq!(b, philox4x32_10([5, 0, 7, 0], [42, 0]));
/// // It holds the words of elements 20..24.
/// assert_eq!(b, [20, 21, 22, 23].map(|i| mask_word(42, 7, i)));
/// ```
#[inline]
pub fn block(seed: u64, call: u64, block: u64) -> [u32; 4] {
    philox4x32_10(
        [
            block as u32,
            (block >> 32) as u32,
            call as u32,
            (call >> 32) as u32,
        ],
        [seed as u32, (seed >> 32) as u32],
    )
}

/// The 32-bit random word of element `index` of call `call` under `seed` (see the module docs).
///
/// ```
/// use fusedreg::philox::{block, mask_word};
/// assert_eq!(mask_word(1, 2, 13), block(1, 2, 3)[1]);
/// ```
#[inline]
pub fn mask_word(seed: u64, call: u64, index: u64) -> u32 {
    block(seed, call, index >> 2)[(index & 3) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer_vectors() {
        // Random123 tests/kat_vectors, philox4x32 10 rounds.
        let kat: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
            (
                [0; 4],
                [0; 2],
                [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
            ),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (c, k, want) in kat {
            assert_eq!(philox4x32_10(c, k), want, "counter {c:08x?} key {k:08x?}");
        }
    }

    #[test]
    fn keying_uses_all_64_bits() {
        // Indices 2^32 apart, calls and seeds differing only in their high words all differ.
        let base = mask_word(5, 9, 17);
        assert_ne!(base, mask_word(5, 9, 17 + (1 << 34)));
        assert_ne!(base, mask_word(5, 9 + (1 << 32), 17));
        assert_ne!(base, mask_word(5 + (1 << 32), 9, 17));
    }
}
