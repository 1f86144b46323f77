//! The region ping service: what Hathora's ping fleet offered and the engine plugins measure.
//! UDP echo on the ping port (the Unreal plugin sends a datagram and times the reply), and
//! WebSocket echo on the same port over TCP (`ws://host:port`, any path, as the TypeScript and
//! Unity samples do with DiscoveryV2's `{host, port}`). The kernel answers ICMP itself.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// Largest echoed WebSocket message frame; a ping needs a few bytes.
const MAX_FRAME: u64 = 64 * 1024;
/// A WebSocket client that says nothing for this long is disconnected.
const IDLE: Duration = Duration::from_secs(300);
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Start both echo services. A port that cannot be bound is logged and skipped.
pub async fn spawn(port: u16) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    match UdpSocket::bind(("0.0.0.0", port)).await {
        Ok(socket) => tasks.push(tokio::spawn(udp_echo(socket))),
        Err(e) => tracing::warn!(port, error = %e, "UDP ping disabled: cannot bind its port"),
    }
    match TcpListener::bind(("0.0.0.0", port)).await {
        Ok(listener) => tasks.push(tokio::spawn(ws_accept(listener))),
        Err(e) => tracing::warn!(port, error = %e, "WebSocket ping disabled: cannot bind its port"),
    }
    tasks
}

async fn udp_echo(socket: UdpSocket) {
    let mut buf = [0u8; 1500];
    loop {
        if let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], peer).await;
        }
    }
}

async fn ws_accept(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    if let Err(e) = ws_echo(stream).await {
                        tracing::debug!(error = %e, "ping websocket closed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "ping accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn io_err(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

/// The `Sec-WebSocket-Accept` value for a client key (RFC 6455 §4.2.2).
pub fn accept_key(key: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{}{WS_GUID}", key.trim()).as_bytes(),
    );
    B64.encode(digest.as_ref())
}

/// Read the HTTP upgrade request and answer it; false if it was not a WebSocket upgrade.
async fn handshake(stream: &mut TcpStream) -> std::io::Result<bool> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > 8192 {
            return Err(io_err("request headers too large"));
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .map_err(|_| io_err("handshake timed out"))??;
        if n == 0 {
            return Err(io_err("closed during handshake"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let key = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_string())
    });
    let Some(key) = key else {
        let body =
            "Lodge ping service: open a WebSocket here, or send a UDP datagram to this port\n";
        let res = format!(
            "HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(res.as_bytes()).await?;
        return Ok(false);
    };
    let res = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(&key)
    );
    stream.write_all(res.as_bytes()).await?;
    Ok(true)
}

/// Echo every data frame back as it came (same opcode and FIN bit, unmasked), answer pings,
/// and close when the client closes.
async fn ws_echo(mut stream: TcpStream) -> std::io::Result<()> {
    if !handshake(&mut stream).await? {
        return Ok(());
    }
    loop {
        let mut head = [0u8; 2];
        tokio::time::timeout(IDLE, stream.read_exact(&mut head))
            .await
            .map_err(|_| io_err("idle"))??;
        let (fin_op, opcode) = (head[0] & 0x8f, head[0] & 0x0f);
        let masked = head[1] & 0x80 != 0;
        let len = match head[1] & 0x7f {
            126 => u64::from(stream.read_u16().await?),
            127 => stream.read_u64().await?,
            n => u64::from(n),
        };
        if len > MAX_FRAME {
            send_frame(&mut stream, 0x88, &1009u16.to_be_bytes()).await?;
            return Ok(());
        }
        let mut mask = [0u8; 4];
        if masked {
            stream.read_exact(&mut mask).await?;
        }
        let mut payload = vec![0u8; len as usize];
        stream.read_exact(&mut payload).await?;
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        match opcode {
            0x0..=0x2 => send_frame(&mut stream, fin_op, &payload).await?,
            0x8 => {
                let code = payload.get(..2).unwrap_or(&[0x03, 0xe8]).to_vec();
                send_frame(&mut stream, 0x88, &code).await?;
                return Ok(());
            }
            0x9 => send_frame(&mut stream, 0x8a, &payload).await?,
            0xa => {}
            _ => {
                send_frame(&mut stream, 0x88, &1002u16.to_be_bytes()).await?;
                return Ok(());
            }
        }
    }
}

async fn send_frame(stream: &mut TcpStream, first: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(first);
    match payload.len() {
        n @ 0..=125 => out.push(n as u8),
        n @ 126..=65535 => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    stream.write_all(&out).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn accept_key_matches_rfc_6455() {
        // The handshake example of RFC 6455 §1.3.
        assert_eq!(
            super::accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
