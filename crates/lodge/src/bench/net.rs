//! Socket measurements, with plain blocking sockets on threads so the client side is the same
//! (and as light as possible) whatever the target: a game server directly, Lodge's proxy, or
//! nginx.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Round trips of `n` sequential `size`-byte datagrams, in microseconds (lost ones skipped).
pub fn udp_rtts(target: SocketAddr, n: usize, size: usize) -> std::io::Result<Vec<f64>> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(target)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut out = Vec::with_capacity(n);
    let mut buf = vec![0u8; 2048];
    let mut msg = vec![7u8; size.max(8)];
    for i in 0..n as u64 {
        msg[..8].copy_from_slice(&i.to_le_bytes());
        let t0 = Instant::now();
        s.send(&msg)?;
        loop {
            match s.recv(&mut buf) {
                Ok(k) if k >= 8 && buf[..8] == msg[..8] => {
                    out.push(t0.elapsed().as_secs_f64() * 1e6);
                    break;
                }
                Ok(_) => continue, // a late reply to an earlier probe
                Err(_) => break,
            }
        }
    }
    Ok(out)
}

/// Send `rate` datagrams per second of `size` bytes for `secs`; returns (sent, echoed back).
pub fn udp_rate(
    target: SocketAddr,
    rate: u64,
    secs: f64,
    size: usize,
) -> std::io::Result<(u64, u64)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(target)?;
    // A large receive buffer, so the client is not where packets are lost.
    let r = s.try_clone()?;
    r.set_read_timeout(Some(Duration::from_millis(300)))?;
    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let rx = {
        let (received, done) = (received.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                match r.recv(&mut buf) {
                    Ok(_) => {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) if done.load(Ordering::Relaxed) => return,
                    Err(_) => {}
                }
            }
        })
    };
    let msg = vec![1u8; size];
    let start = Instant::now();
    let total = (rate as f64 * secs) as u64;
    let mut sent = 0u64;
    while sent < total {
        // Pace in 1 ms slices.
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            if s.send(&msg).is_ok() {
                sent += 1;
            }
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::Relaxed);
    let _ = rx.join();
    Ok((sent, received.load(Ordering::Relaxed)))
}

/// The highest rate (datagrams/s) echoed with at most 0.1 % loss, found by doubling then
/// bisecting; `secs` per trial.
pub fn max_udp_rate(target: SocketAddr, start: u64, cap: u64, secs: f64) -> std::io::Result<u64> {
    let ok = |rate: u64| -> std::io::Result<bool> {
        let (sent, got) = udp_rate(target, rate, secs, 100)?;
        Ok(sent > 0 && (got as f64) >= sent as f64 * 0.999)
    };
    let (mut good, mut bad) = (0u64, 0u64);
    let mut rate = start;
    while rate <= cap {
        if ok(rate)? {
            good = rate;
            rate *= 2;
        } else {
            bad = rate;
            break;
        }
    }
    if bad == 0 {
        return Ok(good);
    }
    for _ in 0..3 {
        let mid = (good + bad) / 2;
        if ok(mid)? {
            good = mid;
        } else {
            bad = mid;
        }
    }
    Ok(good)
}

/// Bytes per second echoed back over one TCP connection during `secs`.
pub fn tcp_throughput(target: SocketAddr, secs: f64) -> std::io::Result<f64> {
    let mut w = TcpStream::connect(target)?;
    w.set_nodelay(true)?;
    let mut r = w.try_clone()?;
    r.set_read_timeout(Some(Duration::from_millis(500)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let chunk = vec![3u8; 64 * 1024];
            while !stop.load(Ordering::Relaxed) {
                if w.write_all(&chunk).is_err() {
                    return;
                }
            }
        })
    };
    let mut buf = vec![0u8; 256 * 1024];
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes += n as u64,
            Err(_) => break,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = r.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    Ok(bytes as f64 / elapsed)
}

/// New connections per second (connect, one byte echoed, close) with `workers` threads.
pub fn tcp_connection_rate(target: SocketAddr, secs: f64, workers: usize) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let count = count.clone();
            std::thread::spawn(move || {
                let mut b = [0u8; 1];
                while start.elapsed().as_secs_f64() < secs {
                    let Ok(mut c) = TcpStream::connect_timeout(&target, Duration::from_secs(1))
                    else {
                        continue;
                    };
                    let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                    if c.write_all(b"x").is_ok() && c.read_exact(&mut b).is_ok() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// `clients` UDP clients (each its own socket, sends spread evenly over the period) each
/// sending a 100-byte datagram every `period` for `secs`: their round trips (µs) and the
/// fraction lost.
/// What [`udp_many`] measured, in µs.
#[derive(Default)]
pub struct ManyClients {
    /// Round trips after each client's first, which opened its session.
    pub rtts: Vec<f64>,
    /// Each client's first round trip (a proxy sets up the flow on it).
    pub firsts: Vec<f64>,
    /// Share of datagrams without an echo before the client's next send.
    pub lost: f64,
}

pub async fn udp_many(
    target: SocketAddr,
    clients: usize,
    period: Duration,
    secs: f64,
) -> std::io::Result<ManyClients> {
    let mut sockets = Vec::with_capacity(clients);
    for _ in 0..clients {
        let s = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
        s.connect(target).await?;
        sockets.push(s);
    }
    // Clients start spread over one period, once every socket exists.
    let mut tasks = tokio::task::JoinSet::new();
    let start = tokio::time::Instant::now();
    for (i, s) in sockets.into_iter().enumerate() {
        let offset = period.mul_f64(i as f64 / clients as f64);
        tasks.spawn(async move {
            let (mut sent, mut rtts, mut first) = (0u64, Vec::new(), None);
            let mut buf = [0u8; 2048];
            let mut next = start + offset;
            let mut seq = 0u64;
            while start.elapsed().as_secs_f64() < secs {
                tokio::time::sleep_until(next).await;
                next += period;
                seq += 1;
                let mut msg = [5u8; 100];
                msg[..8].copy_from_slice(&seq.to_le_bytes());
                let t0 = Instant::now();
                if s.send(&msg).await.is_err() {
                    continue;
                }
                sent += 1;
                // Wait for this datagram's echo until the next send is due.
                let deadline = next;
                loop {
                    match tokio::time::timeout_at(deadline, s.recv(&mut buf)).await {
                        Ok(Ok(n)) if n >= 8 && buf[..8] == msg[..8] => {
                            let us = t0.elapsed().as_secs_f64() * 1e6;
                            if seq == 1 {
                                first = Some(us);
                            } else {
                                rtts.push(us);
                            }
                            break;
                        }
                        Ok(Ok(_)) => continue,
                        _ => break,
                    }
                }
            }
            (sent, rtts, first)
        });
    }
    let mut m = ManyClients::default();
    let mut sent = 0;
    while let Some(r) = tasks.join_next().await {
        let (s, r, first) = r.map_err(std::io::Error::other)?;
        sent += s;
        m.rtts.extend(r);
        m.firsts.extend(first);
    }
    let answered = m.rtts.len() + m.firsts.len();
    m.lost = (1.0 - answered as f64 / sent.max(1) as f64).max(0.0);
    Ok(m)
}

/// Wait until a UDP echo answers at `target`.
pub fn wait_udp(target: SocketAddr, timeout: Duration) -> bool {
    let Ok(s) = UdpSocket::bind("0.0.0.0:0") else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(1)));
    let start = Instant::now();
    let mut buf = [0u8; 64];
    while start.elapsed() < timeout {
        let _ = s.send_to(b"ping", target);
        if let Ok((_, from)) = s.recv_from(&mut buf) {
            if from.port() == target.port() {
                return true;
            }
        }
    }
    false
}
