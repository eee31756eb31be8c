//! Which shard of the Redis cluster serves a key, so that reads can be
//! grouped per shard: the cluster client fails a whole pipeline when one of
//! the nodes it touches fails, and a master down must cost only its own
//! keys, not every batch.
//!
//! The map comes from `CLUSTER SLOTS` and is only a grouping hint: the
//! client still routes every command itself (and follows MOVED), so a stale
//! map costs at worst a coarser grouping, never a wrong answer.

use redis::Value;

/// Hash slots in a Redis cluster.
const SLOTS: u16 = 16384;

/// The hash slot of `key` (CRC16/XMODEM of the key, or of its `{hash tag}`).
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % SLOTS
}

/// Slot ranges and the shard (by order of first appearance) serving each.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ShardMap {
    /// Sorted by first slot: (first, last, shard).
    ranges: Vec<(u16, u16, usize)>,
    shards: usize,
}

impl ShardMap {
    /// Parses a `CLUSTER SLOTS` reply: an array of `[first, last, [ip, port,
    /// id...], replicas...]`. Anything malformed yields an empty map (one
    /// group: the old behaviour).
    pub fn from_cluster_slots(reply: &Value) -> Self {
        let Value::Array(entries) = reply else {
            return Self::default();
        };
        let mut masters: Vec<Vec<u8>> = Vec::new();
        let mut ranges = Vec::with_capacity(entries.len());
        for entry in entries {
            let Value::Array(fields) = entry else {
                return Self::default();
            };
            let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return Self::default();
            };
            let (Ok(first), Ok(last)) = (u16::try_from(*first), u16::try_from(*last)) else {
                return Self::default();
            };
            if first > last || last >= SLOTS {
                return Self::default();
            }
            let name = node_name(master);
            let shard = match masters.iter().position(|m| *m == name) {
                Some(shard) => shard,
                None => {
                    masters.push(name);
                    masters.len() - 1
                }
            };
            ranges.push((first, last, shard));
        }
        ranges.sort_unstable();
        Self {
            ranges,
            shards: masters.len(),
        }
    }

    /// Number of groups [`ShardMap::shard_of`] returns (at least 1).
    pub fn shards(&self) -> usize {
        self.shards.max(1)
    }

    /// The group of `key`: its shard, or 0 if the map does not cover it.
    pub fn shard_of(&self, key: &[u8]) -> usize {
        let slot = slot(key);
        let at = self.ranges.partition_point(|&(first, _, _)| first <= slot);
        match at.checked_sub(1).map(|i| self.ranges[i]) {
            Some((_, last, shard)) if slot <= last => shard,
            _ => 0,
        }
    }
}

/// A master's identity in a `CLUSTER SLOTS` entry: its address and port.
fn node_name(master: &[Value]) -> Vec<u8> {
    let mut name = Vec::new();
    for field in master.iter().take(2) {
        match field {
            Value::BulkString(bytes) => name.extend_from_slice(bytes),
            Value::SimpleString(text) => name.extend_from_slice(text.as_bytes()),
            Value::Int(port) => name.extend_from_slice(format!(":{port}").as_bytes()),
            _ => {}
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `redis-cli CLUSTER KEYSLOT`.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
    }

    fn entry(first: i64, last: i64, port: i64) -> Value {
        Value::Array(vec![
            Value::Int(first),
            Value::Int(last),
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
            ]),
        ])
    }

    #[test]
    fn keys_group_by_the_master_serving_their_slot() {
        let map = ShardMap::from_cluster_slots(&Value::Array(vec![
            entry(10923, 16383, 7002),
            entry(0, 5460, 7000),
            entry(5461, 10922, 7001),
        ]));
        assert_eq!(map.shards(), 3);
        assert_eq!(map.shard_of(b"foo"), map.shard_of(b"{foo}x"));
        assert_ne!(map.shard_of(b"foo"), map.shard_of(b"bar"));
        // Malformed replies give one group.
        let bad = ShardMap::from_cluster_slots(&Value::Array(vec![Value::Int(3)]));
        assert_eq!((bad.shards(), bad.shard_of(b"foo")), (1, 0));
        let reversed = ShardMap::from_cluster_slots(&Value::Array(vec![entry(9, 3, 1)]));
        assert_eq!(reversed.shards(), 1);
    }
}
