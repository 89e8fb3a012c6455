//! A simulated proxy's discovery stream: one mTLS connection, one `Discover` call that
//! subscribes to a fixed set of names (naming the versions it already holds), and a
//! task that records when each answer arrives. The control-plane figures (`control_plane`,
//! `fleet`) are read from those records, in an [`ArrivalLog`] that many streams share.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_proto::api::discovery::discovery_client::DiscoveryClient;
use tessera_proto::api::discovery::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::control_plane::Connector;
use crate::error::{BenchError, Result};

/// Requests waiting to be sent on one stream (the bench sends one at a time).
const REQUESTS_QUEUED: usize = 4;
/// How long a stream may take to be answered for what it waits for.
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// Resource name → the version a stream holds; an empty version: known to be absent.
pub type Known = HashMap<String, String>;

/// What one stream subscribes to, and what it already holds.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// Which stream of the run this is (as the log names it).
    pub stream: usize,
    pub names: Vec<String>,
    /// Sent as `known`: versions held from an earlier connection.
    pub known: Known,
    /// The stream counts as synced once each of these names was answered (a resource
    /// or `absent`): every name on a first connection, what changed when resuming.
    pub synced_when: HashSet<String>,
}

impl Subscription {
    /// A first connection: nothing known, synced when everything was answered.
    pub fn fresh(stream: usize, names: Vec<String>) -> Self {
        Self {
            stream,
            synced_when: names.iter().cloned().collect(),
            names,
            known: Known::new(),
        }
    }
}

/// One message as a stream received it.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub stream: usize,
    pub at: Instant,
    /// Names of the resources it carried.
    pub resources: Vec<String>,
    /// Names it said are absent.
    pub absent: Vec<String>,
}

impl Arrival {
    fn answers(&self, name: &str) -> bool {
        self.resources.iter().chain(&self.absent).any(|n| n == name)
    }
}

/// Every message every stream received since the log was last taken.
#[derive(Debug, Default)]
pub struct ArrivalLog {
    arrivals: Mutex<Vec<Arrival>>,
    /// Woken at each arrival.
    arrived: Notify,
}

impl ArrivalLog {
    fn push(&self, arrival: Arrival) {
        self.lock().push(arrival);
        self.arrived.notify_waiters();
    }

    /// Empties the log, returning what it held.
    pub fn take(&self) -> Vec<Arrival> {
        std::mem::take(&mut *self.lock())
    }

    /// When a message answering `name` arrived after `since`, if one did.
    fn answered_since(&self, name: &str, since: Instant) -> Option<Instant> {
        self.lock()
            .iter()
            .find(|a| a.at >= since && a.answers(name))
            .map(|a| a.at)
    }

    /// Messages that answered `name` (streams receive each change once).
    pub fn answers(&self, name: &str) -> usize {
        self.lock().iter().filter(|a| a.answers(name)).count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arrival>> {
        self.arrivals.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connected, synced stream. Its task ends when the stream does (the control plane
/// went away) and hands back the versions it held.
pub struct Subscriber {
    stream: usize,
    /// More requests on the same stream; holding it keeps the request side open.
    requests: mpsc::Sender<DiscoveryRequest>,
    task: JoinHandle<Known>,
}

impl Subscriber {
    /// Connects, subscribes, and returns once the stream is synced.
    pub async fn connect(
        connector: &Connector,
        subscription: Subscription,
        log: Arc<ArrivalLog>,
    ) -> Result<Self> {
        let channel = connector.channel().await?;
        let request = DiscoveryRequest {
            subscribe: subscription.names.clone(),
            known: subscription.known.clone(),
            ..Default::default()
        };
        let (sender, receiver) = mpsc::channel(REQUESTS_QUEUED);
        let _ = sender.try_send(request);
        let requests = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|request| (request, receiver))
        });
        let responses = DiscoveryClient::new(channel.clone())
            .discover(requests)
            .await
            .map_err(|status| BenchError::failed("Discover", status))?
            .into_inner();
        let stream = subscription.stream;
        let (synced, is_synced) = oneshot::channel();
        let task = tokio::spawn(follow(channel, responses, subscription, synced, log));
        match tokio::time::timeout(SYNC_TIMEOUT, is_synced).await {
            Ok(Ok(())) => Ok(Self {
                stream,
                requests: sender,
                task,
            }),
            Ok(Err(_)) => Err(BenchError::failed(
                "discovery stream",
                "closed before it was synced",
            )),
            Err(_) => Err(BenchError::failed(
                "discovery stream",
                format!("not synced within {} s", SYNC_TIMEOUT.as_secs()),
            )),
        }
    }

    /// Which stream of the run this is.
    pub fn stream(&self) -> usize {
        self.stream
    }

    /// Subscribes to one more name on the open stream; the time until it was answered.
    pub async fn round_trip(&self, name: &str, log: &ArrivalLog) -> Result<Duration> {
        let sent = Instant::now();
        self.requests
            .send(DiscoveryRequest {
                subscribe: vec![name.to_string()],
                ..Default::default()
            })
            .await
            .map_err(|_| BenchError::failed("subscribe", "the stream has ended"))?;
        let deadline = sent + SYNC_TIMEOUT;
        loop {
            let arrived = log.arrived.notified();
            if let Some(at) = log.answered_since(name, sent) {
                return Ok(at.saturating_duration_since(sent));
            }
            if Instant::now() > deadline {
                return Err(BenchError::failed(
                    format!("subscribe to {name}"),
                    "no answer",
                ));
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), arrived).await;
        }
    }

    /// Waits for the stream to end; its number and the versions it held.
    pub async fn closed(self) -> Result<(usize, Known)> {
        let known = self
            .task
            .await
            .map_err(|e| BenchError::failed("discovery stream task", e))?;
        Ok((self.stream, known))
    }
}

/// Reads the stream until it ends, logging each message and keeping the versions.
async fn follow(
    _channel: Channel,
    mut responses: Streaming<DiscoveryResponse>,
    subscription: Subscription,
    synced: oneshot::Sender<()>,
    log: Arc<ArrivalLog>,
) -> Known {
    let Subscription {
        stream,
        mut known,
        synced_when: mut waiting_for,
        ..
    } = subscription;
    let mut synced = Some(synced);
    signal_if_synced(&waiting_for, &mut synced);
    while let Ok(Some(response)) = responses.message().await {
        let at = Instant::now();
        let mut resources = Vec::with_capacity(response.resources.len());
        for resource in response.resources {
            waiting_for.remove(&resource.name);
            known.insert(resource.name.clone(), resource.version);
            resources.push(resource.name);
        }
        for name in &response.absent {
            waiting_for.remove(name);
            known.insert(name.clone(), String::new());
        }
        log.push(Arrival {
            stream,
            at,
            resources,
            absent: response.absent,
        });
        signal_if_synced(&waiting_for, &mut synced);
    }
    known
}

fn signal_if_synced(waiting_for: &HashSet<String>, synced: &mut Option<oneshot::Sender<()>>) {
    if waiting_for.is_empty()
        && let Some(synced) = synced.take()
    {
        let _ = synced.send(());
    }
}
