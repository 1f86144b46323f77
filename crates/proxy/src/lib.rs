//! The data plane: every public port forwards to one process port, over TCP or UDP, either
//! by the kernel ([`kernel`]: nftables DNAT into the process's network namespace) or by
//! Lodge's own sockets (this file's [`Route`], for processes without a namespace of their own).
//!
//! A [`Route`] owns its listener and every connection or UDP session it accepted; dropping it
//! closes them all, which is how a process's ports are released when it ends. Counters are per
//! process and shared by all of its routes.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinSet};

mod conntrack;
pub mod kernel;
pub mod tls;

/// How long a UDP session lives without traffic.
pub const UDP_SESSION_TTL: Duration = Duration::from_secs(60);
/// Most UDP peers one public port serves at once (Hathora's `maxProcessConnections`); each
/// holds an upstream socket, so spoofed sources cannot exhaust file descriptors.
pub const MAX_UDP_SESSIONS: usize = 1024;
/// A UDP session the game server never answered ends this soon: a flood of spoofed sources,
/// one datagram each, cannot hold sessions (and their sockets) for a minute apiece.
pub const UDP_UNREPLIED_TTL: Duration = Duration::from_secs(5);
/// TCP connections one public port carries at once.
pub const MAX_TCP_CONNECTIONS: usize = 1024;

/// Flows (UDP sessions and TCP connections) of a whole node, shared by all its public ports:
/// a cap for the node, so that players can never take the descriptors the API and the agent
/// need, and a cap per source address, so that one host cannot take the node's share.
#[derive(Debug)]
pub struct FlowLimits {
    max_flows: usize,
    per_source: usize,
    flows: std::sync::atomic::AtomicUsize,
    by_source: std::sync::Mutex<HashMap<std::net::IpAddr, usize>>,
    /// Flows refused because a cap was reached.
    pub refused: AtomicU64,
}

impl Default for FlowLimits {
    fn default() -> Self {
        Self::new(16_384, 256)
    }
}

impl FlowLimits {
    pub fn new(max_flows: usize, per_source: usize) -> Self {
        Self {
            max_flows,
            per_source,
            flows: Default::default(),
            by_source: Default::default(),
            refused: AtomicU64::new(0),
        }
    }

    /// Limits sized to a descriptor limit: `reserve` descriptors stay free for everything but
    /// players (the API, the store, logs), and a TCP flow costs two.
    pub fn for_descriptors(nofile: u64, reserve: u64, per_source: usize) -> Self {
        let flows = nofile.saturating_sub(reserve) / 2;
        Self::new(flows.max(64) as usize, per_source)
    }

    pub fn max_flows(&self) -> usize {
        self.max_flows
    }

    pub fn active(&self) -> usize {
        self.flows.load(Ordering::Relaxed)
    }

    /// A permit for one more flow from `peer`, or `None` when a cap is reached.
    fn admit(self: &Arc<Self>, peer: std::net::IpAddr) -> Option<FlowPermit> {
        let peer = lodge_model::source_key(peer);
        let mut by_source = self.by_source.lock().unwrap_or_else(|p| p.into_inner());
        let n = by_source.get(&peer).copied().unwrap_or(0);
        if n >= self.per_source || self.flows.load(Ordering::Relaxed) >= self.max_flows {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        by_source.insert(peer, n + 1);
        self.flows.fetch_add(1, Ordering::Relaxed);
        Some(FlowPermit {
            limits: self.clone(),
            peer,
        })
    }
}

/// One admitted flow; gives its place back when dropped.
#[derive(Debug)]
struct FlowPermit {
    limits: Arc<FlowLimits>,
    peer: std::net::IpAddr,
}

impl Drop for FlowPermit {
    fn drop(&mut self) {
        let mut by_source = self
            .limits
            .by_source
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by_source.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                by_source.remove(&self.peer);
            }
        }
        self.limits.flows.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
pub struct Counters {
    /// Open TCP connections plus live UDP sessions.
    pub active_connections: AtomicU64,
    pub total_connections: AtomicU64,
    /// Bytes from players to the process.
    pub bytes_in: AtomicU64,
    /// Bytes from the process to players.
    pub bytes_out: AtomicU64,
    /// Datagrams from new peers dropped because the port had `MAX_UDP_SESSIONS` already.
    pub dropped: AtomicU64,
    /// What the kernel counted on the process's kernel-forwarded ports (read periodically).
    pub kernel: KernelCounts,
}

/// The kernel's counts of a process's forwarded ports, as last read.
#[derive(Debug, Default)]
pub struct KernelCounts {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub flows: AtomicU64,
    pub active: AtomicU64,
}

impl Counters {
    /// Live flows over every port of the process, however forwarded.
    pub fn active(&self) -> u64 {
        self.active_connections.load(Ordering::Relaxed) + self.kernel.active.load(Ordering::Relaxed)
    }

    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Ordering::Relaxed) + self.kernel.bytes_in.load(Ordering::Relaxed)
    }

    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.load(Ordering::Relaxed) + self.kernel.bytes_out.load(Ordering::Relaxed)
    }

    /// Flows ever set up.
    pub fn total_connections(&self) -> u64 {
        self.total_connections.load(Ordering::Relaxed) + self.kernel.flows.load(Ordering::Relaxed)
    }
}

/// Decrements the active count when a connection or session ends, however it ends.
struct ActiveGuard(Arc<Counters>);

impl ActiveGuard {
    fn new(c: &Arc<Counters>) -> Self {
        c.active_connections.fetch_add(1, Ordering::Relaxed);
        c.total_connections.fetch_add(1, Ordering::Relaxed);
        Self(c.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// A forwarding public port. [`Route::close`] releases the port and every flow it carries
/// before it returns; dropping a route does the same in the background.
#[derive(Debug)]
pub struct Route {
    pub public: SocketAddr,
    pub target: SocketAddr,
    pub protocol: Protocol,
    task: Option<tokio::task::JoinHandle<()>>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Route {
    /// Stop forwarding and wait until the public socket and every flow are closed, so the port
    /// can be handed to another process at once.
    pub async fn close(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Route {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A public port of a process, whoever forwards it.
#[derive(Debug)]
pub enum PublicPort {
    /// Lodge's sockets copy every datagram and byte; closed when dropped.
    Userspace(Route),
    /// The kernel forwards it. Dropping this (Lodge stops) leaves the forwarding in place, so
    /// players stay connected; [`close_all`] removes it.
    Kernel {
        entry: kernel::Entry,
        forwarder: Arc<kernel::Forwarder>,
        /// `None` when another program took the port while Lodge was down (the kernel still
        /// forwards it, ahead of that program's socket).
        hold: Option<kernel::Placeholder>,
    },
}

impl PublicPort {
    pub fn public_port(&self) -> u16 {
        match self {
            PublicPort::Userspace(r) => r.public.port(),
            PublicPort::Kernel { entry, .. } => entry.public_port,
        }
    }
}

/// Stop forwarding these ports and wait until each is free for another process: userspace
/// routes close every flow; kernel ports are removed in one transaction per table, with their
/// tracked flows.
pub async fn close_all(ports: Vec<PublicPort>) {
    type Held = Vec<Option<kernel::Placeholder>>;
    let mut kernel: Vec<(Arc<kernel::Forwarder>, Vec<kernel::Entry>, Held)> = Vec::new();
    for p in ports {
        match p {
            PublicPort::Userspace(r) => r.close().await,
            PublicPort::Kernel {
                entry,
                forwarder,
                hold,
            } => match kernel
                .iter_mut()
                .find(|(f, _, _)| Arc::ptr_eq(f, &forwarder))
            {
                Some((_, entries, holds)) => {
                    entries.push(entry);
                    holds.push(hold);
                }
                None => kernel.push((forwarder, vec![entry], vec![hold])),
            },
        }
    }
    for (forwarder, entries, holds) in kernel {
        if let Err(e) = forwarder.remove(&entries).await {
            tracing::warn!(error = %e, table = forwarder.table(), "cannot remove forwarded ports");
        }
        // The placeholders go last: the port is not offered to anyone while still forwarded.
        drop(holds);
    }
}

/// Start forwarding `public` to `target`. Binds before returning, so a taken port is an error
/// the caller sees.
pub async fn open(
    public: SocketAddr,
    target: SocketAddr,
    protocol: Protocol,
    counters: Arc<Counters>,
    limits: Arc<FlowLimits>,
) -> io::Result<Route> {
    open_with(public, target, protocol, None, counters, limits).await
}

/// Start terminating TLS on `public` with `identity`, forwarding plain TCP to `target`.
pub async fn open_tls(
    public: SocketAddr,
    target: SocketAddr,
    identity: &tls::Identity,
    counters: Arc<Counters>,
    limits: Arc<FlowLimits>,
) -> io::Result<Route> {
    let acceptor = Some(identity.acceptor.clone());
    open_with(public, target, Protocol::Tcp, acceptor, counters, limits).await
}

async fn open_with(
    public: SocketAddr,
    target: SocketAddr,
    protocol: Protocol,
    tls: Option<tokio_rustls::TlsAcceptor>,
    counters: Arc<Counters>,
    limits: Arc<FlowLimits>,
) -> io::Result<Route> {
    let (tx, rx) = oneshot::channel();
    let task = match protocol {
        Protocol::Tcp => {
            let listener = TcpListener::bind(public).await?;
            tokio::spawn(tcp_accept_loop(listener, target, tls, counters, limits, rx))
        }
        Protocol::Udp => {
            let socket = bind_udp(public)?;
            tokio::spawn(udp_loop(socket, target, counters, limits, rx))
        }
    };
    Ok(Route {
        public,
        target,
        protocol,
        task: Some(task),
        shutdown: Some(tx),
    })
}

/// Receive buffer of a public UDP port: a burst of new players (each flow is set up on its
/// first datagram) queues here instead of overflowing the kernel's ~200 KiB default.
pub const UDP_RECV_BUFFER: usize = 4 << 20;

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let std = std::net::UdpSocket::bind(addr)?;
    // SO_RCVBUFFORCE (root) may exceed net.core.rmem_max; SO_RCVBUF is capped by it.
    let size = UDP_RECV_BUFFER as libc::c_int;
    if !set_socket_int(&std, libc::SO_RCVBUFFORCE, size) {
        set_socket_int(&std, libc::SO_RCVBUF, size);
    }
    std.set_nonblocking(true)?;
    UdpSocket::from_std(std)
}

/// Set an integer `SOL_SOCKET` option; false if the kernel refused it.
pub(crate) fn set_socket_int(
    socket: &impl std::os::fd::AsRawFd,
    opt: libc::c_int,
    value: libc::c_int,
) -> bool {
    // SAFETY: setsockopt reads one c_int from the pointer we pass, on a socket the caller owns.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

async fn tcp_accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    counters: Arc<Counters>,
    limits: Arc<FlowLimits>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                // Every connection is gone before the listener closes.
                conns.shutdown().await;
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    // Over a cap the connection is closed at once.
                    let permit = match limits.admit(peer.ip()) {
                        Some(p) if conns.len() < MAX_TCP_CONNECTIONS => p,
                        _ => {
                            counters.dropped.fetch_add(1, Ordering::Relaxed);
                            drop(client);
                            continue;
                        }
                    };
                    let counters = counters.clone();
                    let tls = tls.clone();
                    conns.spawn(async move {
                        let _permit = permit;
                        let _guard = ActiveGuard::new(&counters);
                        let ended = match tls {
                            None => tcp_pipe(client, target, &counters).await,
                            Some(acceptor) => tls_pipe(acceptor, client, target, &counters).await,
                        };
                        if let Err(e) = ended {
                            tracing::debug!(%peer, %target, error = %e, "tcp flow ended with error");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn tcp_pipe(client: TcpStream, target: SocketAddr, counters: &Counters) -> io::Result<()> {
    client.set_nodelay(true)?;
    let upstream = TcpStream::connect(target).await?;
    upstream.set_nodelay(true)?;
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let inbound = copy_counted(&mut cr, &mut uw, &counters.bytes_in);
    let outbound = copy_counted(&mut ur, &mut cw, &counters.bytes_out);
    // A clean end of one direction is passed on as a half-close and the other carries on; an
    // error in either (a reset) ends both, so no socket outlives its peer.
    tokio::try_join!(inbound, outbound).map(|_| ())
}

/// A TLS client: the handshake (bounded in time), then plain TCP to the process.
async fn tls_pipe(
    acceptor: tokio_rustls::TlsAcceptor,
    client: TcpStream,
    target: SocketAddr,
    counters: &Counters,
) -> io::Result<()> {
    client.set_nodelay(true)?;
    let tls = tokio::time::timeout(tls::HANDSHAKE_TIMEOUT, acceptor.accept(client))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let upstream = TcpStream::connect(target).await?;
    upstream.set_nodelay(true)?;
    let (mut cr, mut cw) = tokio::io::split(tls);
    let (mut ur, mut uw) = upstream.into_split();
    let inbound = copy_counted(&mut cr, &mut uw, &counters.bytes_in);
    let outbound = copy_counted(&mut ur, &mut cw, &counters.bytes_out);
    tokio::try_join!(inbound, outbound).map(|_| ())
}

async fn copy_counted<R, W>(r: &mut R, w: &mut W, counter: &AtomicU64) -> io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

struct UdpSession {
    upstream: Arc<UdpSocket>,
    last_seen: Arc<AtomicU64>,
    /// Set once the game server has answered on this session.
    replied: Arc<std::sync::atomic::AtomicBool>,
    task: AbortHandle,
    _guard: ActiveGuard,
    _permit: FlowPermit,
}

impl Drop for UdpSession {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now_secs(start: tokio::time::Instant) -> u64 {
    start.elapsed().as_secs()
}

/// One upstream socket per player address, so the game server sees each player as a distinct
/// peer, and replies go back through the public socket to that player.
async fn udp_loop(
    public: UdpSocket,
    target: SocketAddr,
    counters: Arc<Counters>,
    limits: Arc<FlowLimits>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let public = Arc::new(public);
    let mut sessions: HashMap<SocketAddr, UdpSession> = HashMap::new();
    // The reply tasks; they hold the public socket, so they are all ended before it closes.
    let mut replies: JoinSet<()> = JoinSet::new();
    let start = tokio::time::Instant::now();
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; 65_536];
    loop {
        let received = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            _ = sweep.tick() => {
                let now = now_secs(start);
                sessions.retain(|_, s| {
                    let ttl = if s.replied.load(Ordering::Relaxed) {
                        UDP_SESSION_TTL
                    } else {
                        UDP_UNREPLIED_TTL
                    };
                    now.saturating_sub(s.last_seen.load(Ordering::Relaxed)) < ttl.as_secs()
                });
                continue;
            }
            Some(_) = replies.join_next(), if !replies.is_empty() => continue,
            r = public.recv_from(&mut buf) => r,
        };
        let (n, peer) = match received {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors from earlier sends surface here on Linux; they are not fatal.
                tracing::debug!(error = %e, "udp recv error");
                continue;
            }
        };
        let session = match sessions.get(&peer) {
            Some(s) => s,
            None if sessions.len() >= MAX_UDP_SESSIONS => {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            None => match limits.admit(peer.ip()).map(|permit| {
                new_udp_session(
                    &public,
                    peer,
                    target,
                    &counters,
                    permit,
                    start,
                    &mut replies,
                )
            }) {
                None => {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Some(Ok(s)) => sessions.entry(peer).or_insert(s),
                Some(Err(e)) => {
                    tracing::warn!(%peer, %target, error = %e, "cannot open udp session");
                    continue;
                }
            },
        };
        session.last_seen.store(now_secs(start), Ordering::Relaxed);
        // Counted as received from the player, before forwarding: a reply can otherwise
        // overtake the count.
        counters.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        let _ = session.upstream.send(&buf[..n]).await;
    }
    replies.shutdown().await;
    // What the game sent just before the route closed (its last words before exiting, say)
    // is still queued on the upstream sockets: deliver it rather than drop it.
    for (peer, session) in sessions.drain() {
        while let Some(n) = recv_now(&session.upstream, &mut buf) {
            counters.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
            let _ = public.try_send_to(&buf[..n], peer);
        }
    }
}

/// A datagram already queued on `socket`, read without waiting. Tokio's `try_recv` trusts its
/// cached readiness, which may not know yet of what just arrived; this asks the kernel.
fn recv_now(socket: &UdpSocket, buf: &mut [u8]) -> Option<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: recv writes at most `buf.len()` bytes into `buf`, which we own for the call.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).ok()
}

fn new_udp_session(
    public: &Arc<UdpSocket>,
    peer: SocketAddr,
    target: SocketAddr,
    counters: &Arc<Counters>,
    permit: FlowPermit,
    start: tokio::time::Instant,
    replies: &mut JoinSet<()>,
) -> io::Result<UdpSession> {
    let bind: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let std = std::net::UdpSocket::bind(bind)?;
    std.connect(target)?;
    std.set_nonblocking(true)?;
    let upstream = Arc::new(UdpSocket::from_std(std)?);
    let last_seen = Arc::new(AtomicU64::new(now_secs(start)));
    let replied = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let task = {
        let (upstream, public, counters, last_seen, replied) = (
            upstream.clone(),
            public.clone(),
            counters.clone(),
            last_seen.clone(),
            replied.clone(),
        );
        replies.spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                match upstream.recv(&mut buf).await {
                    Ok(n) => {
                        last_seen.store(now_secs(start), Ordering::Relaxed);
                        replied.store(true, Ordering::Relaxed);
                        // Counted before sending, or the player could see the reply first.
                        counters.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                        let _ = public.send_to(&buf[..n], peer).await;
                    }
                    // ECONNREFUSED while the server is not (yet) bound: keep the session.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        })
    };
    Ok(UdpSession {
        upstream,
        last_seen,
        replied,
        task,
        _guard: ActiveGuard::new(counters),
        _permit: permit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn udp_echo() -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, p)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], p).await;
            }
        });
        addr
    }

    async fn tcp_echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    fn free_port() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let u = std::net::UdpSocket::bind(l.local_addr().unwrap());
        drop(u);
        l.local_addr().unwrap()
    }

    #[tokio::test]
    async fn udp_forwarding_counts_sessions_and_bytes() {
        let target = udp_echo().await;
        let counters = Arc::new(Counters::default());
        let public = free_port();
        let route = open(
            public,
            target,
            Protocol::Udp,
            counters.clone(),
            Arc::default(),
        )
        .await
        .unwrap();
        let mut clients = Vec::new();
        for i in 0..3u8 {
            let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            c.send_to(&[i; 10], public).await.unwrap();
            let mut buf = [0u8; 64];
            let (n, from) = tokio::time::timeout(Duration::from_secs(5), c.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buf[..n], &[i; 10]);
            assert_eq!(from, public, "replies come from the public port");
            clients.push(c);
        }
        assert_eq!(counters.active(), 3);
        assert_eq!(counters.bytes_in.load(Ordering::Relaxed), 30);
        assert_eq!(counters.bytes_out.load(Ordering::Relaxed), 30);
        route.close().await;
        assert_eq!(counters.active(), 0, "closing the route ends its sessions");
        // The port is released.
        std::net::UdpSocket::bind(public).unwrap();
    }

    #[tokio::test]
    async fn tcp_forwarding_and_release() {
        let target = tcp_echo().await;
        let counters = Arc::new(Counters::default());
        let public = free_port();
        let route = open(
            public,
            target,
            Protocol::Tcp,
            counters.clone(),
            Arc::default(),
        )
        .await
        .unwrap();
        let mut c = TcpStream::connect(public).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(counters.active(), 1);
        drop(c);
        for _ in 0..100 {
            if counters.active() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(counters.active(), 0);
        assert_eq!(counters.bytes_in.load(Ordering::Relaxed), 5);
        route.close().await;
        std::net::TcpListener::bind(public).unwrap();
    }

    #[tokio::test]
    async fn taken_port_is_an_error() {
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let r = open(
            taken.local_addr().unwrap(),
            "127.0.0.1:9".parse().unwrap(),
            Protocol::Udp,
            Arc::default(),
            Arc::default(),
        )
        .await;
        assert!(r.is_err());
    }

    async fn wait_until(mut f: impl FnMut() -> bool) -> bool {
        for _ in 0..300 {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// One datagram from a new socket of `source` to `public`; whether an answer came back.
    /// The socket is kept in `held`, so that no later socket reuses its port (and its flow).
    async fn answered(source: &str, public: SocketAddr, held: &mut Vec<UdpSocket>) -> bool {
        let c = UdpSocket::bind(format!("{source}:0")).await.unwrap();
        c.send_to(b"hi", public).await.unwrap();
        let mut buf = [0u8; 16];
        let ok = tokio::time::timeout(Duration::from_millis(500), c.recv_from(&mut buf))
            .await
            .is_ok();
        held.push(c);
        ok
    }

    #[tokio::test]
    async fn flows_are_capped_per_source_and_per_node() {
        let target = udp_echo().await;
        let limits = Arc::new(FlowLimits::new(4, 2));
        let public = free_port();
        let counters = Arc::new(Counters::default());
        let route = open(
            public,
            target,
            Protocol::Udp,
            counters.clone(),
            limits.clone(),
        )
        .await
        .unwrap();
        // Two flows from one source, the third refused; another source gets its two, and
        // then the node is full for everyone.
        let mut held = Vec::new();
        let h = &mut held;
        assert!(answered("127.0.0.1", public, h).await);
        assert!(answered("127.0.0.1", public, h).await);
        assert!(
            !answered("127.0.0.1", public, h).await,
            "third flow of one source"
        );
        assert!(answered("127.0.0.2", public, h).await);
        assert!(answered("127.0.0.2", public, h).await);
        assert!(!answered("127.0.0.3", public, h).await, "the node's cap");
        assert_eq!(limits.active(), 4);
        assert_eq!(limits.refused.load(Ordering::Relaxed), 2);
        route.close().await;
        assert_eq!(
            limits.active(),
            0,
            "closing the route gives every flow back"
        );
    }

    #[tokio::test]
    async fn a_reply_sent_as_the_route_closes_still_arrives() {
        let game = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let public = free_port();
        let route = open(
            public,
            game.local_addr().unwrap(),
            Protocol::Udp,
            Arc::default(),
            Arc::default(),
        )
        .await
        .unwrap();
        let player = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        player.send_to(b"exit", public).await.unwrap();
        let mut buf = [0u8; 64];
        let (_, from) = game.recv_from(&mut buf).await.unwrap();
        // The game answers and is gone at once: the route closes right behind the reply.
        game.send_to(b"bye", from).await.unwrap();
        route.close().await;
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), player.recv_from(&mut buf))
            .await
            .expect("the last reply is delivered")
            .unwrap();
        assert_eq!(&buf[..n], b"bye");
    }

    #[tokio::test]
    async fn unanswered_udp_sessions_end_fast() {
        // A game server that never answers: a spoofed source's session must not stay a minute.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let limits = Arc::new(FlowLimits::new(100, 100));
        let public = free_port();
        let route = open(
            public,
            silent.local_addr().unwrap(),
            Protocol::Udp,
            Arc::default(),
            limits.clone(),
        )
        .await
        .unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.send_to(b"spoofed", public).await.unwrap();
        assert!(wait_until(|| limits.active() == 1).await);
        let t0 = std::time::Instant::now();
        // It ends after 5 s, swept each second (the wait is bounded well below the minute an
        // answered session would keep).
        for _ in 0..400 {
            if limits.active() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(limits.active(), 0, "still open after {:?}", t0.elapsed());
        route.close().await;
    }

    #[tokio::test]
    async fn a_client_reset_closes_both_directions() {
        // An upstream that accepts and then never sends nor closes.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = l.local_addr().unwrap();
        let (up_tx, up_rx) = oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 64];
            // Ends when the proxy closes its side.
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            let _ = up_tx.send(());
        });
        let limits = Arc::new(FlowLimits::new(100, 100));
        let counters = Arc::new(Counters::default());
        let public = free_port();
        let route = open(
            public,
            target,
            Protocol::Tcp,
            counters.clone(),
            limits.clone(),
        )
        .await
        .unwrap();
        let c = TcpStream::connect(public).await.unwrap();
        assert!(wait_until(|| counters.active() == 1).await);
        let std = c.into_std().unwrap();
        socket_reset(&std);
        drop(std);
        tokio::time::timeout(Duration::from_secs(5), up_rx)
            .await
            .expect("the upstream connection is closed after the client's reset")
            .unwrap();
        assert!(wait_until(|| counters.active() == 0 && limits.active() == 0).await);
        route.close().await;
    }

    /// Make closing `s` send a reset (SO_LINGER with a zero timeout).
    fn socket_reset(s: &std::net::TcpStream) {
        use std::os::fd::AsRawFd;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt reads the struct we pass for its size.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }
}
