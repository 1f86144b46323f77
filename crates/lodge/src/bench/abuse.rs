//! `abuse`: what hostile traffic costs a live Lodge. Each attack runs against a real `lodge
//! serve` (default per-source limits) while `GET /livez` is timed, next to the quiet baseline
//! of the same run; Lodge's open descriptors and resident memory are read from /proc.
//!
//! Attacks: a UDP flood from thousands of source addresses (one datagram each, the pattern that
//! used to hold a socket per source for a minute), a TCP connection flood on a public port,
//! slow HTTP clients that never finish their headers, and a build whose archive claims a 1 GiB
//! long name.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use super::server::Server;
use super::{median, ms, pct, ratio, room_to_active, BenchArgs, Result, Table};

/// `GET /livez` latencies (ms) over `n` fresh requests.
async fn livez(url: &str, n: usize) -> Vec<f64> {
    let http = reqwest::Client::new();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let ok = http
            .get(format!("{url}/livez"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        out.push(if ok {
            t0.elapsed().as_secs_f64() * 1000.0
        } else {
            5000.0
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    out
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn peak_rss_mb(pid: u32) -> f64 {
    super::server::proc_status_kb(pid, "VmHWM").map_or(f64::NAN, |kb| kb as f64 / 1024.0)
}

/// Measure `/livez` while `attack` runs in the background; also the peak descriptor count.
async fn under<F>(server: &Server, n: usize, attack: F) -> (Vec<f64>, usize)
where
    F: FnOnce(tokio::sync::watch::Receiver<bool>) -> std::thread::JoinHandle<()>,
{
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let handle = attack(stop_rx);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = server.pid();
    let sampler = {
        let stop = stop_tx.subscribe();
        tokio::spawn(async move {
            let mut peak = 0;
            while !*stop.borrow() {
                peak = peak.max(fds(pid));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        })
    };
    let lat = livez(server.url(), n).await;
    let _ = stop_tx.send(true);
    let _ = tokio::task::spawn_blocking(move || handle.join()).await;
    (lat, sampler.await.unwrap_or(0))
}

pub async fn run(args: &BenchArgs) -> Result<Vec<Table>> {
    // Default limits (the bench's usual "every client is 127.0.0.1" exemption undone).
    let server =
        Server::start_with_defaults(&["--isolation", "none", "--registry-allow", "127.0.0.1"])
            .await?;
    let s = server.setup_with_tcp(10).await?;
    let (_, room, _) = room_to_active(&s, "London").await?;
    let info = s.connection_info(&room).await?;
    let udp: SocketAddr = (
        [127, 0, 0, 1],
        info["exposedPort"]["port"].as_u64().unwrap_or(0) as u16,
    )
        .into();
    let tcp: SocketAddr = (
        [127, 0, 0, 1],
        info["additionalExposedPorts"][0]["port"]
            .as_u64()
            .unwrap_or(0) as u16,
    )
        .into();
    let n = if args.quick { 100 } else { 400 };
    let sources = if args.quick { 1000 } else { 4000 };
    let pid = server.pid();
    let mut t = Table::new(
        "Hostile traffic: GET /livez while under attack, against the quiet baseline of the same run",
        &["attack", "livez p50", "livez p99", "p50 ratio", "failed livez", "Lodge fds (peak)", "Lodge RSS (peak)"],
    );
    let quiet = livez(server.url(), n).await;
    let base = median(&quiet);
    let row = |t: &mut Table, name: &str, lat: &[f64], peak_fds: usize| {
        t.row(vec![
            name.to_string(),
            ms(median(lat)),
            ms(pct(lat, 0.99)),
            ratio(median(lat), base),
            lat.iter().filter(|x| **x >= 5000.0).count().to_string(),
            peak_fds.to_string(),
            format!("{:.0} MB", peak_rss_mb(pid)),
        ]);
    };
    row(&mut t, "none (quiet)", &quiet, fds(pid));

    // UDP from many sources: each 127.x.y.z address sends one datagram, again and again.
    let (lat, peak) = under(&server, n, |stop| {
        std::thread::spawn(move || {
            let socks: Vec<UdpSocket> = (0..sources)
                .filter_map(|i| {
                    let ip = std::net::Ipv4Addr::new(
                        127,
                        1 + (i / 65_000) as u8,
                        ((i / 250) % 250) as u8,
                        (i % 250 + 1) as u8,
                    );
                    UdpSocket::bind((ip, 0)).ok()
                })
                .collect();
            while !*stop.borrow() {
                for s in &socks {
                    let _ = s.send_to(b"flood", udp);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    })
    .await;
    row(
        &mut t,
        &format!("UDP: {sources} sources, 1 datagram each every 200 ms"),
        &lat,
        peak,
    );

    // TCP connections opened and held on a public port, from one address.
    let (lat, peak) = under(&server, n, |stop| hold(tcp, sources, b"", stop)).await;
    row(
        &mut t,
        &format!("TCP: {sources} connections held on one public port"),
        &lat,
        peak,
    );

    // Slow HTTP clients: connections to the API that never finish their headers.
    let api: SocketAddr = server
        .url()
        .trim_start_matches("http://")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let (lat, peak) = under(&server, n, |stop| {
        hold(api, sources, b"GET /livez HTTP/1.1\r\nHost: x\r\n", stop)
    })
    .await;
    row(
        &mut t,
        &format!("HTTP: {sources} clients that never finish their headers"),
        &lat,
        peak,
    );

    // Hostile builds: each must fail fast with memory flat (peak RSS is the process's
    // high-water mark, so growth shows even when it is given back).
    let dirs = if args.quick { 150_000 } else { 300_000 };
    let bombs: Vec<(String, Vec<u8>)> = vec![
        (
            "archive claiming a 1 GiB long name".into(),
            metadata_bomb(tar::EntryType::GNULongName),
        ),
        (
            "archive claiming a 1 GiB pax header".into(),
            metadata_bomb(tar::EntryType::XHeader),
        ),
        (
            format!("archive of {dirs} directory entries"),
            directories_bomb(dirs),
        ),
        ("a 15 MB lodge.toml".into(), manifest_bomb()),
    ];
    for (name, archive) in bombs {
        let before = peak_rss_mb(pid);
        let t0 = Instant::now();
        let failed = server.build_fails(archive).await?;
        bomb_row(&mut t, &row, &server, n, &name, failed, t0, before).await;
    }
    // A registry whose manifest never ends.
    let registry = endless_registry()?;
    let before = peak_rss_mb(pid);
    let t0 = Instant::now();
    let failed = server
        .registry_build_fails(&format!("127.0.0.1:{registry}/games/endless:1"))
        .await?;
    bomb_row(
        &mut t,
        &row,
        &server,
        n,
        "registry pull of an endless manifest",
        failed,
        t0,
        before,
    )
    .await;
    server.shutdown(&s).await;
    Ok(vec![t])
}

/// Open up to `n` TCP connections to `addr`, send `first` on each, and hold them until `stop`.
fn hold(
    addr: SocketAddr,
    n: usize,
    first: &'static [u8],
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        use std::io::Write;
        let mut held = Vec::new();
        for _ in 0..n {
            if let Ok(mut c) =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            {
                if !first.is_empty() {
                    let _ = c.write_all(first);
                }
                held.push(c);
            }
        }
        while !*stop.borrow() {
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

/// One row for a hostile build: how it ended, how fast, and the peak RSS before and after.
#[allow(clippy::too_many_arguments)]
async fn bomb_row(
    t: &mut Table,
    row: &impl Fn(&mut Table, &str, &[f64], usize),
    server: &Server,
    n: usize,
    name: &str,
    failed: bool,
    t0: Instant,
    before: f64,
) {
    let took = t0.elapsed().as_secs_f64() * 1000.0;
    let lat = livez(server.url(), n / 4).await;
    row(
        t,
        &format!(
            "{name}: build {} in {took:.0} ms, peak RSS {before:.0} → {:.0} MB",
            if failed { "failed" } else { "SUCCEEDED" },
            peak_rss_mb(server.pid())
        ),
        &lat,
        fds(server.pid()),
    );
}

fn gzip(raw: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, raw).unwrap_or(());
    gz.finish().unwrap_or_default()
}

/// A gzipped tar whose first entry is a metadata entry (GNU long name, pax header) claiming
/// 1 GiB, followed by 1 MiB of it.
fn metadata_bomb(kind: tar::EntryType) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(kind);
    h.set_size(1 << 30);
    h.set_mode(0o644);
    h.set_cksum();
    let mut raw = h.as_bytes().to_vec();
    raw.extend(vec![b'a'; 1 << 20]);
    gzip(&raw)
}

/// A gzipped tar of `n` empty directories.
fn directories_bomb(n: usize) -> Vec<u8> {
    let mut raw = Vec::with_capacity(n * 512 + 1024);
    for i in 0..n {
        let mut h = tar::Header::new_gnu();
        let name = format!("d{i}/");
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        h.set_cksum();
        raw.extend_from_slice(h.as_bytes());
    }
    raw.extend([0u8; 1024]);
    gzip(&raw)
}

/// A gzipped tar holding a 15 MB `lodge.toml`.
fn manifest_bomb() -> Vec<u8> {
    let mut toml = String::from("command = [\"./gs\"]\n[env]\n");
    let mut i = 0;
    while toml.len() < 15 << 20 {
        toml.push_str(&format!("V{i} = \"{}\"\n", "x".repeat(200)));
        i += 1;
    }
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(toml.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    let _ = b.append_data(&mut h, "lodge.toml", toml.as_bytes());
    gzip(&b.into_inner().unwrap_or_default())
}

/// A registry on loopback that answers every request with a manifest that never ends (it stops
/// after 4 GiB or when the client hangs up). Returns its port.
fn endless_registry() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(8) {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut req = [0u8; 4096];
                let _ = c.read(&mut req);
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\r\n{\"schemaVersion\":2,\"x\":\"";
                if c.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let chunk = vec![b'a'; 64 << 10];
                for _ in 0..(4u64 << 30) / chunk.len() as u64 {
                    if c.write_all(&chunk).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(port)
}
