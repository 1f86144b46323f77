//! `lodge echo-server`: the game server of the benchmarks. UDP and TCP echo on one port (and
//! TCP echo on `$PORT_TCP` too when set, the deployment's additional port named `tcp`), as small
//! and fast as a game server can be, so that what is measured is Lodge around it.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

pub fn run(port: u16) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let udp = UdpSocket::bind(("0.0.0.0", port)).await?;
        let mut listeners = vec![TcpListener::bind(("0.0.0.0", port)).await?];
        if let Some(extra) = std::env::var("PORT_TCP")
            .ok()
            .and_then(|p| p.parse::<u16>().ok())
        {
            listeners.push(TcpListener::bind(("0.0.0.0", extra)).await?);
        }
        for tcp in listeners {
            tokio::spawn(tcp_echo(tcp));
        }
        let mut buf = [0u8; 2048];
        loop {
            if let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                let _ = udp.send_to(&buf[..n], peer).await;
            }
        }
    })
}

async fn tcp_echo(tcp: TcpListener) {
    loop {
        let Ok((mut s, _)) = tcp.accept().await else {
            continue;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}
