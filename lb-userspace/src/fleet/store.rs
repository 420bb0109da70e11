//! The fleet's store: JSON documents under one key prefix in etcd.
//!
//! - A shared document (the services) is read with its revision and written only if
//!   nobody wrote it since (a transaction that compares the key's `mod_revision`), so two
//!   operators cannot silently overwrite each other.
//! - A node's own documents (its health view, its tables' digests) live under the node's
//!   name and a lease: when the node stops renewing it, etcd deletes them, and the others
//!   stop counting them.
//! - Watches follow every change under the prefix.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The `fleet` section of the agent's config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// etcd client URLs (`http://10.0.0.5:2379`).
    pub endpoints: Vec<String>,
    /// Every key of this fleet starts with it (`/lb/site1`).
    pub prefix: String,
    /// This node's name in the fleet, unique.
    pub node: String,
    /// A TLS client identity; plain TCP without it.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
}

impl FleetConfig {
    /// What is wrong with the section, as `Config::problems` reports it.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.endpoints.is_empty() {
            p.push("fleet.endpoints: name at least one etcd client URL".into());
        }
        for e in &self.endpoints {
            let scheme_ok = e.starts_with("http://") || e.starts_with("https://");
            if !scheme_ok || e.contains(char::is_whitespace) {
                p.push(format!(
                    "fleet.endpoints: {e:?} is not an http:// or https:// URL"
                ));
            }
        }
        let prefix = self.prefix.trim_end_matches('/');
        if !prefix.starts_with('/') || prefix.len() < 2 || prefix.contains("//") {
            p.push(format!(
                "fleet.prefix: {:?} must start with '/' and name a key path (\"/lb/site1\")",
                self.prefix
            ));
        }
        if !crate::config::is_name(&self.node) {
            p.push(format!(
                "fleet.node: {:?}: {}",
                self.node,
                crate::config::NAME_RULE
            ));
        }
        p
    }
}

/// PEM files for a TLS connection to etcd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("reading {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: not the JSON expected: {source}")]
    Json {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the watch ended (etcd gone, or the history it asked for compacted)")]
    WatchEnded,
    #[error("{key} changed since it was read (revision {expected}, now {found}): read it again")]
    Conflict {
        key: String,
        expected: i64,
        found: i64,
    },
}

/// A document and the revision that last wrote it (0: absent).
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    pub value: Option<T>,
    pub revision: i64,
}

/// A change under the prefix, as a watch reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The key without the prefix (`services`, `health/lb1`).
    pub name: String,
    /// The new value, `None` when the key was deleted (or its lease ended).
    pub value: Option<Vec<u8>>,
    pub revision: i64,
}

/// A connection to the store; clones share it.
#[derive(Clone)]
pub struct Store {
    client: Client,
    prefix: String,
}

impl Store {
    pub async fn connect(cfg: &FleetConfig) -> Result<Self, StoreError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some(tls) = &cfg.tls {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|source| StoreError::File {
                    path: path.clone(),
                    source,
                })
            };
            opts = opts.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(read(&tls.ca)?))
                    .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?)),
            );
        }
        let client = Client::connect(&cfg.endpoints, Some(opts)).await?;
        Ok(Store {
            client,
            prefix: cfg.prefix.trim_end_matches('/').to_owned(),
        })
    }

    fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }

    /// Document `name` with its revision.
    pub async fn get<T: DeserializeOwned>(
        &mut self,
        name: &str,
    ) -> Result<Versioned<T>, StoreError> {
        let key = self.key(name);
        let resp = self.client.get(key.as_str(), None).await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(Versioned {
                value: None,
                revision: 0,
            });
        };
        let value = serde_json::from_slice(kv.value())
            .map_err(|source| StoreError::Json { key, source })?;
        Ok(Versioned {
            value: Some(value),
            revision: kv.mod_revision(),
        })
    }

    /// Writes document `name` if it is still at `revision` (0: if it does not exist).
    /// Returns the new revision.
    pub async fn put_if<T: Serialize>(
        &mut self,
        name: &str,
        value: &T,
        revision: i64,
    ) -> Result<i64, StoreError> {
        let key = self.key(name);
        let json = encode(&key, value)?;
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::put(key.as_str(), json, None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let resp = self.client.txn(txn).await?;
        if resp.succeeded() {
            return Ok(resp.header().map_or(0, |h| h.revision()));
        }
        let found = resp
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(g) => {
                    Some(g.kvs().first().map_or(0, |kv| kv.mod_revision()))
                }
                _ => None,
            })
            .unwrap_or(0);
        Err(StoreError::Conflict {
            key,
            expected: revision,
            found,
        })
    }

    /// Holds document `name` (`value`) under `lease` unless another holder has it: a
    /// transaction that writes only if the key does not exist. Returns the holder's value,
    /// `value` itself when this call took it or already held it. The key goes with its
    /// holder's lease, and the next call of another node takes it: an election.
    pub async fn hold<T: Serialize + DeserializeOwned>(
        &mut self,
        name: &str,
        value: &T,
        lease: &Lease,
    ) -> Result<T, StoreError> {
        let key = self.key(name);
        let json = encode(&key, value)?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                json.clone(),
                Some(PutOptions::new().with_lease(lease.id)),
            )])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let resp = self.client.txn(txn).await?;
        let held = resp.op_responses().into_iter().find_map(|op| match op {
            etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        let bytes = if resp.succeeded() {
            json
        } else {
            held.unwrap_or(json)
        };
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Json { key, source })
    }

    /// A lease of `ttl`, renewed by the returned keeper (`renew` at least every ttl/3).
    pub async fn lease(&mut self, ttl: Duration) -> Result<Lease, StoreError> {
        let id = self
            .client
            .lease_grant(ttl.as_secs().max(1) as i64, None)
            .await?
            .id();
        let (keeper, _responses) = self.client.lease_keep_alive(id).await?;
        Ok(Lease { id, keeper })
    }

    /// Writes document `name` tied to `lease`: it goes when the lease ends.
    pub async fn put_leased<T: Serialize>(
        &mut self,
        name: &str,
        value: &T,
        lease: &Lease,
    ) -> Result<i64, StoreError> {
        let key = self.key(name);
        let json = encode(&key, value)?;
        let resp = self
            .client
            .put(key, json, Some(PutOptions::new().with_lease(lease.id)))
            .await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Every document below `dir` (`health`), by the rest of its key (the node's name).
    /// One that does not parse (another version's, say) is left out and named, so that
    /// it costs the reader that document only, not the list.
    pub async fn list<T: DeserializeOwned>(&mut self, dir: &str) -> Result<Listed<T>, StoreError> {
        let base = self.key(&format!("{dir}/"));
        let resp = self
            .client
            .get(base.as_str(), Some(GetOptions::new().with_prefix()))
            .await?;
        let mut out = Listed {
            docs: BTreeMap::new(),
            unreadable: BTreeMap::new(),
        };
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let name = key[base.len()..].to_owned();
            match serde_json::from_slice(kv.value()) {
                Ok(v) => {
                    out.docs.insert(name, v);
                }
                Err(e) => {
                    out.unreadable.insert(key, e.to_string());
                }
            }
        }
        Ok(out)
    }

    /// Every document under the prefix (names without it), and the store's revision
    /// they were read at: a watch from that revision misses nothing.
    pub async fn read_all(&mut self) -> Result<(i64, Vec<Change>), StoreError> {
        let base = format!("{}/", self.prefix);
        let resp = self
            .client
            .get(base.as_str(), Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let docs = resp
            .kvs()
            .iter()
            .map(|kv| Change {
                name: String::from_utf8_lossy(kv.key())
                    .get(base.len()..)
                    .unwrap_or_default()
                    .to_owned(),
                value: Some(kv.value().to_vec()),
                revision: kv.mod_revision(),
            })
            .collect();
        Ok((revision, docs))
    }

    /// Follows the changes after `revision` (0: from now) of the documents whose names
    /// sort from `first` to `last` (both included, `last` as a whole name): a part of the
    /// prefix, so a node need not hear of what it does not use.
    pub async fn watch_between(
        &mut self,
        revision: i64,
        first: &str,
        last: &str,
    ) -> Result<Watch, StoreError> {
        let mut end = self.key(last).into_bytes();
        end.push(0);
        let mut opts = WatchOptions::new().with_range(end);
        if revision > 0 {
            opts = opts.with_start_revision(revision + 1);
        }
        let stream = self.client.watch(self.key(first), Some(opts)).await?;
        Ok(Watch {
            stream,
            strip: self.prefix.len() + 1,
        })
    }

    /// Follows every change under the prefix after `revision` (0: from now).
    pub async fn watch(&mut self, revision: i64) -> Result<Watch, StoreError> {
        let mut opts = WatchOptions::new().with_prefix();
        if revision > 0 {
            opts = opts.with_start_revision(revision + 1);
        }
        let stream = self
            .client
            .watch(format!("{}/", self.prefix), Some(opts))
            .await?;
        Ok(Watch {
            stream,
            strip: self.prefix.len() + 1,
        })
    }
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Json {
        key: key.to_owned(),
        source,
    })
}

/// The documents below a key, and those that did not parse.
#[derive(Debug)]
pub struct Listed<T> {
    /// By the rest of their key.
    pub docs: BTreeMap<String, T>,
    /// Full key -> why it did not parse.
    pub unreadable: BTreeMap<String, String>,
}

/// A lease of this node's documents.
pub struct Lease {
    id: i64,
    keeper: LeaseKeeper,
}

impl Lease {
    pub async fn renew(&mut self) -> Result<(), StoreError> {
        Ok(self.keeper.keep_alive().await?)
    }
}

pub struct Watch {
    stream: WatchStream,
    strip: usize,
}

impl Watch {
    /// The next batch of changes; `None` when the watch ended (etcd gone, or the revision
    /// asked for compacted away: read again and watch again).
    pub async fn next(&mut self) -> Result<Option<Vec<Change>>, StoreError> {
        let resp = loop {
            match self.stream.message().await? {
                None => return Ok(None),
                Some(r) if r.canceled() => return Ok(None),
                // The watch's own "created" answer, and progress notes, carry no events.
                Some(r) if r.events().is_empty() => continue,
                Some(r) => break r,
            }
        };
        Ok(Some(
            resp.events()
                .iter()
                .filter_map(|e| {
                    let kv = e.kv()?;
                    let key = String::from_utf8_lossy(kv.key());
                    Some(Change {
                        name: key.get(self.strip..).unwrap_or_default().to_owned(),
                        value: (e.event_type() == EventType::Put).then(|| kv.value().to_vec()),
                        revision: kv.mod_revision(),
                    })
                })
                .collect(),
        ))
    }
}
