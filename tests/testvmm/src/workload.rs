//! Guest operations, as the control socket receives them.

use serde::{Deserialize, Serialize};

/// One operation the guest performs over a range of pages.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// Fresh pseudo-random content, unique per (page, seed).
    Random { first: u32, count: u32, seed: u32 },
    /// Pages become copies of page `src`.
    Copy { src: u32, first: u32, count: u32 },
    /// Pages become all zero.
    Zero { first: u32, count: u32 },
    /// One u32 written at byte 8 of each page.
    Touch { first: u32, count: u32, value: u32 },
    /// Like touch, on pages first, first+step, ...
    Stride {
        first: u32,
        count: u32,
        step: u32,
        value: u32,
    },
}

impl Op {
    /// Checks the op against a RAM of `pages` pages.
    pub fn validate(&self, pages: u32) -> Result<(), String> {
        let (first, count, last) = match *self {
            Op::Random { first, count, .. }
            | Op::Zero { first, count }
            | Op::Touch { first, count, .. } => (
                first,
                count,
                u64::from(first) + u64::from(count).saturating_sub(1),
            ),
            Op::Copy { src, first, count } => {
                if src >= pages {
                    return Err(format!(
                        "copy source page {src} is outside RAM ({pages} pages)"
                    ));
                }
                if src >= first && src < first.saturating_add(count) {
                    return Err(format!(
                        "copy source page {src} lies inside its destination range"
                    ));
                }
                (
                    first,
                    count,
                    u64::from(first) + u64::from(count).saturating_sub(1),
                )
            }
            Op::Stride {
                first, count, step, ..
            } => {
                if step == 0 {
                    return Err("stride step must be at least 1".into());
                }
                (
                    first,
                    count,
                    u64::from(first) + u64::from(count.saturating_sub(1)) * u64::from(step),
                )
            }
        };
        if count == 0 {
            return Err("count must be at least 1".into());
        }
        if last >= u64::from(pages) {
            return Err(format!(
                "pages {first}..={last} reach outside RAM ({pages} pages)"
            ));
        }
        Ok(())
    }

    /// Guest writes per page. Under KVM's instruction emulator every written
    /// dword is pushed to the dirty ring, so a `rep movsd` page costs 1024
    /// entries (on hardware it costs one).
    pub fn writes_per_page(&self) -> u32 {
        match self {
            Op::Touch { .. } | Op::Stride { .. } => 1,
            Op::Random { .. } => 1026,
            Op::Copy { .. } | Op::Zero { .. } => 1024,
        }
    }

    /// The same op on at most `pages` pages at a time.
    pub fn chunks(&self, pages: u32) -> Vec<Op> {
        let pages = pages.max(1);
        let (first, count) = match *self {
            Op::Random { first, count, .. }
            | Op::Copy { first, count, .. }
            | Op::Zero { first, count }
            | Op::Touch { first, count, .. }
            | Op::Stride { first, count, .. } => (first, count),
        };
        (0..count.div_ceil(pages))
            .map(|i| {
                let n = pages.min(count - i * pages);
                match *self {
                    Op::Random { seed, .. } => Op::Random {
                        first: first + i * pages,
                        count: n,
                        seed,
                    },
                    Op::Copy { src, .. } => Op::Copy {
                        src,
                        first: first + i * pages,
                        count: n,
                    },
                    Op::Zero { .. } => Op::Zero {
                        first: first + i * pages,
                        count: n,
                    },
                    Op::Touch { value, .. } => Op::Touch {
                        first: first + i * pages,
                        count: n,
                        value,
                    },
                    Op::Stride { step, value, .. } => Op::Stride {
                        first: first + i * pages * step,
                        count: n,
                        step,
                        value,
                    },
                }
            })
            .collect()
    }

    /// The op's name in the protocol.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Random { .. } => "random",
            Op::Copy { .. } => "copy",
            Op::Zero { .. } => "zero",
            Op::Touch { .. } => "touch",
            Op::Stride { .. } => "stride",
        }
    }

    /// Distinct pages written.
    pub fn pages(&self) -> u64 {
        match *self {
            Op::Random { count, .. }
            | Op::Copy { count, .. }
            | Op::Zero { count, .. }
            | Op::Touch { count, .. }
            | Op::Stride { count, .. } => u64::from(count),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_rejects_what_would_escape_ram() {
        assert!(
            Op::Touch {
                first: 0,
                count: 10,
                value: 1
            }
            .validate(10)
            .is_ok()
        );
        assert!(
            Op::Touch {
                first: 1,
                count: 10,
                value: 1
            }
            .validate(10)
            .is_err()
        );
        assert!(Op::Zero { first: 0, count: 0 }.validate(10).is_err());
        assert!(
            Op::Copy {
                src: 3,
                first: 0,
                count: 5
            }
            .validate(10)
            .is_err()
        );
        assert!(
            Op::Stride {
                first: 0,
                count: 4,
                step: 3,
                value: 0
            }
            .validate(10)
            .is_ok()
        );
        assert!(
            Op::Stride {
                first: 0,
                count: 5,
                step: 3,
                value: 0
            }
            .validate(10)
            .is_err()
        );
        let chunks = Op::Stride {
            first: 1,
            count: 5,
            step: 2,
            value: 9,
        }
        .chunks(2);
        assert_eq!(
            chunks,
            vec![
                Op::Stride {
                    first: 1,
                    count: 2,
                    step: 2,
                    value: 9
                },
                Op::Stride {
                    first: 5,
                    count: 2,
                    step: 2,
                    value: 9
                },
                Op::Stride {
                    first: 9,
                    count: 1,
                    step: 2,
                    value: 9
                },
            ]
        );
        let parsed: Op =
            serde_json::from_str(r#"{"op":"random","first":1,"count":2,"seed":3}"#).unwrap();
        assert_eq!(
            parsed,
            Op::Random {
                first: 1,
                count: 2,
                seed: 3
            }
        );
        assert!(serde_json::from_str::<Op>(r#"{"op":"random","first":1}"#).is_err());
    }
}
