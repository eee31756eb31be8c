//! The site-wide template store: a Redis cluster the operator already runs,
//! shared by every host of a site (see docs/site-catalog.md).
//!
//! Keys (hashes in lowercase hex; each key lives on the master its name
//! hashes to, so the load spreads over the cluster):
//!
//! ```text
//! pagefp:c:<hash>          hash   host id -> VMs of that host holding the content
//! pagefp:p:<hash>          string the 4096-byte page, stored once (SET NX), with a TTL
//! pagefp:host:<host>       string the host's lease (PX lease): absent = the host is gone
//! pagefp:hosts             set    every host that published
//! pagefp:hc:<host>:<xx>    set    the contents a host published, by first hash byte
//!                                 (what to delete when it is gone)
//! pagefp:s:<xx>            set    the contents whose page is stored, by first hash
//!                                 byte (what the site's budget ranks)
//! pagefp:curator           string the host that keeps the site within its budget
//!                                 (PX: a lease, taken over when it lapses)
//! ```
//!
//! Nothing read from the store is trusted: a page is used only if its
//! blake3 equals the hash it was asked for, counts only rank contents, and
//! every call has a deadline. A store that is down or slow costs bytes on the
//! WAN (pages travel in full), never a migration.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use redis::{
    ClientTlsConfig, TlsCertificates, Value,
    cluster::{ClusterClient, ClusterConnection, cluster_pipe},
    cluster_read_routing::RandomReplicaStrategy,
};

use super::site_shards::ShardMap;
use crate::{config::SiteStoreConfig, content::PageHash, net::tls::read_pem, page::PAGE_SIZE};

/// Commands per pipeline: large enough to hide round trips, small enough
/// that one failing node loses little.
pub const BATCH: usize = 256;
/// How long one call to the store may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

const PREFIX: &str = "pagefp:";
const HOSTS: &str = "pagefp:hosts";
const CURATOR: &str = "pagefp:curator";

fn hex(hash: &PageHash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

fn content_key(hash: &PageHash) -> String {
    format!("{PREFIX}c:{}", hex(hash))
}

fn page_key(hash: &PageHash) -> String {
    format!("{PREFIX}p:{}", hex(hash))
}

fn lease_key(host: &str) -> String {
    format!("{PREFIX}host:{host}")
}

fn index_key(host: &str, hash: &PageHash) -> String {
    format!("{PREFIX}hc:{host}:{:02x}", hash[0])
}

fn stored_key(bucket: u8) -> String {
    format!("{PREFIX}s:{bucket:02x}")
}

/// What the store was asked to do, for the operator and the benchmark.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreTraffic {
    /// Commands sent.
    pub commands: u64,
    /// Bytes of those commands (RESP, as sent).
    pub bytes_sent: u64,
    /// Pipelines that failed (a node down or slow; retried next time).
    pub errors: u64,
}

/// One connection to the site's Redis cluster.
pub struct SiteStore {
    connection: ClusterConnection,
    /// The same cluster, reading from replicas: where a shard whose master
    /// failed is read from.
    replicas: ClusterClient,
    replica_connection: Option<ClusterConnection>,
    pub traffic: StoreTraffic,
}

impl SiteStore {
    /// Whether `config` can work at all: nodes named, all `rediss://`
    /// (TLS), or all `redis://` with plaintext accepted by name.
    pub fn check(config: &SiteStoreConfig) -> anyhow::Result<()> {
        if config.nodes.is_empty() {
            bail!("no site store configured: give --site-store rediss://HOST:PORT");
        }
        let tls = config.nodes[0].starts_with("rediss://");
        for node in &config.nodes {
            if node.contains('#') {
                bail!(
                    "site store {node}: a URL fragment (such as #insecure, which turns off \
                     certificate checks) is not accepted; give rediss://HOST:PORT"
                );
            }
            if !node.starts_with("rediss://") && !node.starts_with("redis://") {
                bail!(
                    "site store {node}: give it as rediss://HOST:PORT (TLS) or redis://HOST:PORT"
                );
            }
            if node.starts_with("rediss://") != tls {
                bail!(
                    "site store nodes {} mix rediss:// and redis://: one cluster speaks one of them",
                    config.nodes.join(", ")
                );
            }
            if !tls && !config.plaintext {
                bail!(
                    "site store {node} is unencrypted: template pages are checked against their \
                     hashes, but anyone on that network can read them. Use rediss:// (TLS, with \
                     --site-store-tls-dir), or pass --site-store-plaintext (`plaintext = true` \
                     under [site]) to accept that on a network you trust"
                );
            }
        }
        Ok(())
    }

    /// The CA and client certificate for `rediss://` nodes.
    fn certificates(config: &SiteStoreConfig) -> anyhow::Result<TlsCertificates> {
        let dir = config
            .tls_dir
            .clone()
            .unwrap_or_else(|| crate::net::tls::DEFAULT_DIR.into());
        let root = read_pem(&dir, "ca-cert.pem").context(
            "the site store's CA: put the CA that signed the Redis nodes' certificates in \
             ca-cert.pem of --site-store-tls-dir",
        )?;
        let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
        let client_tls = match (cert.exists(), key.exists()) {
            (true, true) => Some(ClientTlsConfig {
                client_cert: read_pem(&dir, "client-cert.pem")?,
                client_key: read_pem(&dir, "client-key.pem")?,
            }),
            (false, false) => None,
            _ => bail!(
                "{} holds only one of client-cert.pem and client-key.pem: give both or neither",
                dir.display()
            ),
        };
        Ok(TlsCertificates {
            client_tls,
            root_cert: Some(root),
        })
    }

    /// Connects to the cluster `config` names (see [`SiteStore::check`]).
    pub fn connect(config: &SiteStoreConfig) -> anyhow::Result<Self> {
        Self::check(config)?;
        let certificates = if config.nodes[0].starts_with("rediss://") {
            Some(Self::certificates(config)?)
        } else {
            None
        };
        let builder = || {
            let builder = ClusterClient::builder(config.nodes.clone())
                .connection_timeout(CALL_TIMEOUT)
                .response_timeout(CALL_TIMEOUT)
                .retries(1)
                .max_retry_wait(200);
            match &certificates {
                Some(certificates) => builder.certs(certificates.clone()),
                None => builder,
            }
        };
        let named = || format!("site store {}", config.nodes.join(", "));
        let client = builder().build().with_context(named)?;
        let connection = client.get_connection().with_context(|| {
            format!(
                "connecting to the site store at {}: is the Redis cluster up, and is this a \
                 cluster node?{}",
                config.nodes.join(", "),
                if certificates.is_some() {
                    " For TLS: are ca-cert.pem (the nodes' CA) and client-cert.pem (a \
                     certificate the nodes accept) in --site-store-tls-dir the site's?"
                } else {
                    ""
                }
            )
        })?;
        // Pages are checked against their hashes, so a replica's slightly
        // older copy is as good as the master's when the master is down.
        let replicas = builder()
            .read_routing_strategy(RandomReplicaStrategy)
            .build()
            .with_context(named)?;
        Ok(Self {
            connection,
            replicas,
            replica_connection: None,
            traffic: StoreTraffic::default(),
        })
    }

    /// Runs one pipeline, counting it.
    fn run(&mut self, pipe: &redis::cluster::ClusterPipeline) -> redis::RedisResult<Vec<Value>> {
        self.count(pipe);
        let result = pipe.query::<Vec<Value>>(&mut self.connection);
        if result.is_err() {
            self.traffic.errors += 1;
        }
        result
    }

    /// Runs a read-only pipeline on the shards' replicas (connecting on
    /// first use).
    fn run_on_replicas(
        &mut self,
        pipe: &redis::cluster::ClusterPipeline,
    ) -> redis::RedisResult<Vec<Value>> {
        self.count(pipe);
        let connection = match &mut self.replica_connection {
            Some(connection) => connection,
            empty => empty.insert(self.replicas.get_connection().inspect_err(|_| {
                self.traffic.errors += 1;
            })?),
        };
        let result = pipe.query::<Vec<Value>>(connection);
        if result.is_err() {
            self.traffic.errors += 1;
        }
        result
    }

    fn count(&mut self, pipe: &redis::cluster::ClusterPipeline) {
        for cmd in pipe.cmd_iter() {
            self.traffic.commands += 1;
            self.traffic.bytes_sent += cmd.get_packed_command().len() as u64;
        }
    }

    /// Which shard serves which slot, for grouping reads (an empty map, one
    /// group, if the cluster does not say).
    fn shard_map(&mut self) -> ShardMap {
        // Sent to any node: try a few, in case the first is the one down.
        for _ in 0..3 {
            self.traffic.commands += 1;
            match redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query::<Value>(&mut self.connection)
            {
                Ok(reply) => return ShardMap::from_cluster_slots(&reply),
                Err(_) => self.traffic.errors += 1,
            }
        }
        ShardMap::default()
    }

    /// The pages of `hashes` the store holds, each checked against its
    /// hash (`None`: not there, wrong, or not fetched before `deadline`).
    /// Reads are pipelined per shard, from its master; a shard whose master
    /// fails is read from its replicas, and a shard that fails both ways is
    /// not asked again during this fetch: only its own pages stay `None`.
    pub fn fetch_pages(&mut self, hashes: &[PageHash], deadline: Instant) -> Fetched {
        let keys: Vec<String> = hashes.iter().map(page_key).collect();
        let map = self.shard_map();
        let mut by_shard: Vec<Vec<usize>> = vec![Vec::new(); map.shards()];
        for (at, key) in keys.iter().enumerate() {
            by_shard[map.shard_of(key.as_bytes())].push(at);
        }
        let mut fetched = Fetched {
            pages: (0..hashes.len()).map(|_| None).collect(),
            ..Fetched::default()
        };
        for shard in &by_shard {
            let mut on_replicas = false;
            let mut batches = shard.chunks(BATCH);
            for batch in batches.by_ref() {
                if Instant::now() >= deadline {
                    fetched.late += batch.len() as u64;
                    continue;
                }
                let mut pipe = cluster_pipe();
                for &at in batch {
                    pipe.cmd("GET").arg(&keys[at]);
                }
                let mut values = if on_replicas {
                    self.run_on_replicas(&pipe)
                } else {
                    self.run(&pipe)
                };
                if values.is_err() && !on_replicas && Instant::now() < deadline {
                    on_replicas = true;
                    fetched.from_replicas = true;
                    values = self.run_on_replicas(&pipe);
                }
                let Ok(values) = values else {
                    fetched.failed += batch.len() as u64;
                    break;
                };
                for (&at, value) in batch
                    .iter()
                    .zip(values.into_iter().chain(std::iter::repeat(Value::Nil)))
                {
                    if let Value::BulkString(bytes) = value {
                        fetched.bytes += bytes.len() as u64;
                        fetched.pages[at] = checked_page(&hashes[at], &bytes);
                    }
                    if fetched.pages[at].is_none() {
                        fetched.missing += 1;
                    }
                }
            }
            // What is left of a failed shard.
            fetched.failed += batches.map(|batch| batch.len() as u64).sum::<u64>();
        }
        fetched
    }
}

/// `bytes` as a page, if it is one and its blake3 is `hash`.
fn checked_page(hash: &PageHash, bytes: &[u8]) -> Option<Box<[u8; PAGE_SIZE]>> {
    let page: &[u8; PAGE_SIZE] = bytes.try_into().ok()?;
    (blake3::hash(page).as_bytes() == hash).then(|| Box::new(*page))
}

/// What [`SiteStore::fetch_pages`] got, in the order asked.
#[derive(Default)]
pub struct Fetched {
    pub pages: Vec<Option<Box<[u8; PAGE_SIZE]>>>,
    /// Bytes received for pages.
    pub bytes: u64,
    /// Pages not in the store, or whose bytes did not match their hash.
    pub missing: u64,
    /// Pages of shards that failed (master down without a replica, timeout).
    pub failed: u64,
    /// Whether some shard had to be read from its replicas.
    pub from_replicas: bool,
    /// Pages not asked for: the deadline had passed.
    pub late: u64,
}

/// One host's publication of what it holds (the agent's side).
pub struct HostPublisher {
    pub store: SiteStore,
    pub host: String,
    lease: Duration,
    min_hosts: u32,
    page_ttl: Duration,
}

impl HostPublisher {
    pub fn new(
        store: SiteStore,
        host: String,
        lease: Duration,
        min_hosts: u32,
        page_ttl: Duration,
    ) -> anyhow::Result<Self> {
        if host.is_empty() || host.contains(char::is_whitespace) || host.contains(':') {
            bail!("host id `{host}` must be non-empty, without spaces or colons");
        }
        Ok(Self {
            store,
            host,
            lease,
            min_hosts,
            page_ttl,
        })
    }

    /// Renews this host's lease (and lists it among the hosts).
    pub fn renew_lease(&mut self) -> redis::RedisResult<()> {
        let mut pipe = cluster_pipe();
        pipe.cmd("SET")
            .arg(lease_key(&self.host))
            .arg(1)
            .arg("PX")
            .arg(self.lease.as_millis() as u64)
            .ignore();
        pipe.cmd("SADD").arg(HOSTS).arg(&self.host).ignore();
        self.store.run(&pipe).map(drop)
    }

    /// Publishes that this host holds each of `held` in that many VMs and
    /// no longer holds `released` (applied first: a content released and
    /// held again is held). Returns the contents this host newly holds.
    pub fn publish(
        &mut self,
        held: &[(PageHash, u32)],
        released: &[PageHash],
    ) -> redis::RedisResult<Vec<PageHash>> {
        for batch in released.chunks(BATCH / 2) {
            let mut pipe = cluster_pipe();
            for hash in batch {
                pipe.cmd("HDEL")
                    .arg(content_key(hash))
                    .arg(&self.host)
                    .ignore();
                pipe.cmd("SREM")
                    .arg(index_key(&self.host, hash))
                    .arg(hash.as_slice())
                    .ignore();
            }
            self.store.run(&pipe)?;
        }
        let mut new = Vec::new();
        for batch in held.chunks(BATCH / 2) {
            let mut pipe = cluster_pipe();
            for (hash, vms) in batch {
                pipe.cmd("HSET")
                    .arg(content_key(hash))
                    .arg(&self.host)
                    .arg(*vms);
                pipe.cmd("SADD")
                    .arg(index_key(&self.host, hash))
                    .arg(hash.as_slice())
                    .ignore();
            }
            let added = self.store.run(&pipe)?;
            new.extend(
                batch
                    .iter()
                    .zip(added)
                    .filter(|(_, added)| matches!(added, Value::Int(1)))
                    .map(|((hash, _), _)| *hash),
            );
        }
        Ok(new)
    }

    /// Of contents this host just came to hold, those the site now holds on
    /// enough hosts whose page is not stored yet (a page already stored
    /// has its TTL renewed).
    pub fn pages_wanted(&mut self, new: &[PageHash]) -> redis::RedisResult<Vec<PageHash>> {
        let mut wanted = Vec::new();
        for batch in new.chunks(BATCH / 3) {
            let mut pipe = cluster_pipe();
            for hash in batch {
                pipe.cmd("HLEN").arg(content_key(hash));
                pipe.cmd("PEXPIRE")
                    .arg(page_key(hash))
                    .arg(self.page_ttl.as_millis() as u64);
            }
            let values = self.store.run(&pipe)?;
            for (hash, pair) in batch.iter().zip(values.chunks(2)) {
                let hosts = match pair.first() {
                    Some(Value::Int(n)) => *n,
                    _ => 0,
                };
                let stored = matches!(pair.get(1), Some(Value::Int(1)));
                if hosts >= i64::from(self.min_hosts) && !stored {
                    wanted.push(*hash);
                }
            }
        }
        Ok(wanted)
    }

    /// Stores pages (each checked against its hash first; a page that no
    /// longer matches is skipped). Only the first host's copy is kept.
    pub fn store_pages(
        &mut self,
        pages: &[(PageHash, &[u8; PAGE_SIZE])],
    ) -> redis::RedisResult<u64> {
        let mut stored = 0;
        for batch in pages.chunks(BATCH / 4) {
            let mut pipe = cluster_pipe();
            let mut commands = 0;
            for (hash, page) in batch {
                if blake3::hash(*page).as_bytes() != hash {
                    continue;
                }
                commands += 1;
                pipe.cmd("SET")
                    .arg(page_key(hash))
                    .arg(page.as_slice())
                    .arg("NX")
                    .arg("PX")
                    .arg(self.page_ttl.as_millis() as u64);
                pipe.cmd("SADD")
                    .arg(stored_key(hash[0]))
                    .arg(hash.as_slice())
                    .ignore();
            }
            if commands == 0 {
                continue;
            }
            let values = self.store.run(&pipe)?;
            stored += values.iter().filter(|v| matches!(v, Value::Okay)).count() as u64;
        }
        Ok(stored)
    }

    /// Removes every count `host` published (this host's own on a resync
    /// or a restart; a dead host's when its lease is gone).
    pub fn forget_host(&mut self, host: &str) -> redis::RedisResult<u64> {
        let mut forgotten = 0;
        for bucket in 0..=255u8 {
            let key = format!("{PREFIX}hc:{host}:{bucket:02x}");
            let hashes = self.members(&key)?;
            for batch in hashes.chunks(BATCH) {
                let mut pipe = cluster_pipe();
                for hash in batch {
                    pipe.cmd("HDEL").arg(content_key(hash)).arg(host).ignore();
                }
                self.store.run(&pipe)?;
            }
            forgotten += hashes.len() as u64;
            let mut pipe = cluster_pipe();
            pipe.cmd("DEL").arg(&key).ignore();
            self.store.run(&pipe)?;
        }
        Ok(forgotten)
    }

    /// Hosts that published but whose lease has ended (not this one).
    pub fn dead_hosts(&mut self) -> redis::RedisResult<Vec<String>> {
        let hosts = live_hosts(&mut self.store)?;
        Ok(hosts
            .into_iter()
            .filter(|(host, live)| !live && *host != self.host)
            .map(|(host, _)| host)
            .collect())
    }

    /// Keeps the site within its budget of `cap` stored pages, if this host
    /// is the site's curator (it holds, or takes over, the curator lease
    /// for `lease`): when more are stored, keeps the best ranked 90% of
    /// `cap` (held by more VMs, then more hosts, then by hash: the host
    /// selection's order, without page counts, which the site does not
    /// keep) and deletes the rest. `None`: another host curates.
    pub fn curate(&mut self, cap: u64, lease: Duration) -> redis::RedisResult<Option<Curation>> {
        if !self.curator_lease(lease)? {
            return Ok(None);
        }
        let mut pipe = cluster_pipe();
        for bucket in 0..=255u8 {
            pipe.cmd("SCARD").arg(stored_key(bucket));
        }
        let stored: u64 = self
            .store
            .run(&pipe)?
            .iter()
            .map(|v| match v {
                Value::Int(n) => u64::try_from(*n).unwrap_or(0),
                _ => 0,
            })
            .sum();
        let mut curation = Curation {
            stored,
            ..Curation::default()
        };
        if stored <= cap {
            return Ok(Some(curation));
        }
        let mut hashes: Vec<PageHash> = Vec::new();
        for bucket in 0..=255u8 {
            hashes.extend(self.members(&stored_key(bucket))?);
        }
        // Pages whose TTL ended leave their name behind: drop it.
        let mut present = Vec::with_capacity(hashes.len());
        for batch in hashes.chunks(BATCH) {
            let mut pipe = cluster_pipe();
            for hash in batch {
                pipe.cmd("EXISTS").arg(page_key(hash));
            }
            let exists = self.store.run(&pipe)?;
            present.extend(exists.iter().map(|v| matches!(v, Value::Int(1))));
        }
        let (live, expired): (Vec<_>, Vec<_>) = hashes
            .into_iter()
            .zip(present)
            .partition(|(_, present)| *present);
        let expired: Vec<PageHash> = expired.into_iter().map(|(hash, _)| hash).collect();
        let live: Vec<PageHash> = live.into_iter().map(|(hash, _)| hash).collect();
        let counts = site_counts(&mut self.store, &live)?;
        let mut ranked: Vec<(PageHash, SiteCount)> = live.into_iter().zip(counts).collect();
        ranked.sort_unstable_by(|(a, ca), (b, cb)| {
            cb.vms
                .cmp(&ca.vms)
                .then(cb.hosts.cmp(&ca.hosts))
                .then(a.cmp(b))
        });
        let keep = usize::try_from(cap - cap / 10).unwrap_or(usize::MAX);
        let evicted: Vec<PageHash> = ranked.iter().skip(keep).map(|(hash, _)| *hash).collect();
        for batch in evicted.chunks(BATCH / 2) {
            let mut pipe = cluster_pipe();
            for hash in batch {
                pipe.cmd("UNLINK").arg(page_key(hash)).ignore();
                pipe.cmd("SREM")
                    .arg(stored_key(hash[0]))
                    .arg(hash.as_slice())
                    .ignore();
            }
            self.store.run(&pipe)?;
        }
        for batch in expired.chunks(BATCH) {
            let mut pipe = cluster_pipe();
            for hash in batch {
                pipe.cmd("SREM")
                    .arg(stored_key(hash[0]))
                    .arg(hash.as_slice())
                    .ignore();
            }
            self.store.run(&pipe)?;
        }
        curation.evicted = evicted.len() as u64;
        curation.expired = expired.len() as u64;
        Ok(Some(curation))
    }

    /// Whether this host is the curator: it takes the lease when no host
    /// holds it, and renews it when it does.
    fn curator_lease(&mut self, lease: Duration) -> redis::RedisResult<bool> {
        let px = lease.as_millis() as u64;
        let mut pipe = cluster_pipe();
        pipe.cmd("SET")
            .arg(CURATOR)
            .arg(&self.host)
            .arg("NX")
            .arg("PX")
            .arg(px);
        pipe.cmd("GET").arg(CURATOR);
        let values = self.store.run(&pipe)?;
        let holder = match values.get(1) {
            Some(Value::BulkString(bytes)) => bytes.as_slice() == self.host.as_bytes(),
            _ => false,
        };
        if holder && !matches!(values.first(), Some(Value::Okay)) {
            let mut pipe = cluster_pipe();
            pipe.cmd("PEXPIRE").arg(CURATOR).arg(px).ignore();
            self.store.run(&pipe)?;
        }
        Ok(holder)
    }

    /// The 32-byte members of the set `key`.
    fn members(&mut self, key: &str) -> redis::RedisResult<Vec<PageHash>> {
        let mut pipe = cluster_pipe();
        pipe.cmd("SMEMBERS").arg(key);
        let members = match self.store.run(&pipe)?.pop() {
            Some(Value::Array(members)) | Some(Value::Set(members)) => members,
            _ => Vec::new(),
        };
        Ok(members
            .into_iter()
            .filter_map(|member| match member {
                Value::BulkString(bytes) => bytes.try_into().ok(),
                _ => None,
            })
            .collect())
    }

    /// Forgets a dead host entirely: its counts, then its name.
    pub fn reap(&mut self, host: &str) -> redis::RedisResult<u64> {
        let forgotten = self.forget_host(host)?;
        let mut pipe = cluster_pipe();
        pipe.cmd("SREM").arg(HOSTS).arg(host).ignore();
        self.store.run(&pipe)?;
        Ok(forgotten)
    }
}

/// Every host that published, and whether its lease is current.
pub fn live_hosts(store: &mut SiteStore) -> redis::RedisResult<Vec<(String, bool)>> {
    let mut pipe = cluster_pipe();
    pipe.cmd("SMEMBERS").arg(HOSTS);
    let hosts: Vec<String> = match store.run(&pipe)?.pop() {
        Some(Value::Array(members)) | Some(Value::Set(members)) => members
            .into_iter()
            .filter_map(|member| match member {
                Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let mut live = Vec::with_capacity(hosts.len());
    for batch in hosts.chunks(BATCH) {
        let mut pipe = cluster_pipe();
        for host in batch {
            pipe.cmd("EXISTS").arg(lease_key(host));
        }
        let values = store.run(&pipe)?;
        live.extend(
            batch
                .iter()
                .zip(values)
                .map(|(host, value)| (host.clone(), matches!(value, Value::Int(1)))),
        );
    }
    Ok(live)
}

/// How many live hosts, and VMs on them, hold each of `hashes` (hosts whose
/// lease ended are not counted, even before they are reaped).
pub fn site_counts(
    store: &mut SiteStore,
    hashes: &[PageHash],
) -> redis::RedisResult<Vec<SiteCount>> {
    let live: std::collections::HashSet<String> = live_hosts(store)?
        .into_iter()
        .filter(|(_, live)| *live)
        .map(|(host, _)| host)
        .collect();
    let mut counts = Vec::with_capacity(hashes.len());
    for batch in hashes.chunks(BATCH) {
        let mut pipe = cluster_pipe();
        for hash in batch {
            pipe.cmd("HGETALL").arg(content_key(hash));
        }
        for value in store.run(&pipe)? {
            let mut count = SiteCount::default();
            let pairs: Vec<(Value, Value)> = match value {
                Value::Map(pairs) => pairs,
                Value::Array(flat) => {
                    let mut flat = flat.into_iter();
                    std::iter::from_fn(|| Some((flat.next()?, flat.next()?))).collect()
                }
                _ => Vec::new(),
            };
            for (host, vms) in pairs {
                let host = match host {
                    Value::BulkString(bytes) => String::from_utf8(bytes).unwrap_or_default(),
                    _ => continue,
                };
                let vms = match vms {
                    Value::BulkString(bytes) => std::str::from_utf8(&bytes)
                        .ok()
                        .and_then(|s| s.parse::<u32>().ok())
                        .unwrap_or(0),
                    Value::Int(n) => u32::try_from(n).unwrap_or(0),
                    _ => 0,
                };
                if live.contains(&host) {
                    count.hosts += 1;
                    count.vms = count.vms.saturating_add(vms);
                }
            }
            counts.push(count);
        }
    }
    Ok(counts)
}

/// What one pass of [`HostPublisher::curate`] found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Curation {
    /// Pages the site listed as stored before the pass.
    pub stored: u64,
    /// Pages deleted to bring the site within its budget.
    pub evicted: u64,
    /// Names of pages whose TTL had ended, dropped from the list.
    pub expired: u64,
}

/// How widely the site holds one content.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteCount {
    pub hosts: u32,
    pub vms: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_is_refused_unless_asked_for_by_name() {
        let config = |nodes: &[&str], plaintext: bool| SiteStoreConfig {
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            plaintext,
            tls_dir: Some("/nonexistent-pagefp-pki".into()),
        };
        let refused = |config: SiteStoreConfig| SiteStore::connect(&config).err().unwrap();
        let err = refused(config(&["redis://127.0.0.1:1"], false)).to_string();
        assert!(
            err.contains("--site-store-plaintext") && err.contains("rediss://"),
            "{err}"
        );
        // TLS needs the CA; the error names the file and the flag.
        let err = format!("{:#}", refused(config(&["rediss://127.0.0.1:1"], false)));
        assert!(
            err.contains("ca-cert.pem") && err.contains("--site-store-tls-dir"),
            "{err}"
        );
        // Certificate checks cannot be turned off by a URL.
        let err = refused(config(&["rediss://127.0.0.1:1/#insecure"], true)).to_string();
        assert!(err.contains("#insecure"), "{err}");
        let err = refused(config(
            &["rediss://127.0.0.1:1", "redis://127.0.0.1:2"],
            true,
        ));
        assert!(err.to_string().contains("mix"), "{err}");
        assert!(SiteStore::connect(&SiteStoreConfig::default()).is_err());
    }

    #[test]
    fn a_page_is_used_only_if_it_matches_its_hash() {
        let page = [3u8; PAGE_SIZE];
        let hash = *blake3::hash(&page).as_bytes();
        assert!(checked_page(&hash, &page).is_some());
        assert!(checked_page(&[0; 32], &page).is_none());
        assert!(checked_page(&hash, &page[1..]).is_none());
        assert!(checked_page(&hash, &[]).is_none());
    }

    #[test]
    fn keys_spread_by_hash_and_name_the_host() {
        let hash = [0xabu8; 32];
        assert_eq!(content_key(&hash), format!("pagefp:c:{}", "ab".repeat(32)));
        assert_eq!(index_key("h1", &hash), "pagefp:hc:h1:ab");
        assert_eq!(lease_key("h1"), "pagefp:host:h1");
    }
}
