// The load balancer of replicas mode (LODGE_TEST_REPLICAS), run by lib/lodge.js in a worker
// thread of the test process: a test that blocks its own thread (execFileSync, a long
// synchronous loop) must not stall the front, which agents and CLI children depend on, any
// more than it would stall a one-box `lodge serve`.
//
// workerData: {host, ports (the replicas' API ports, in order), mode ('round-robin' | 'first'),
// counts (an Int32Array on a SharedArrayBuffer: requests sent to each replica)}. Posts
// {listening: port} once it listens; on {close: true} it ends every connection and exits.

import http from 'node:http';
import net from 'node:net';
import { parentPort, workerData } from 'node:worker_threads';

/** Hop-by-hop headers: between a client and the front only, never passed on. */
const HOP_BY_HOP = new Set([
  'connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'te', 'trailer', 'upgrade',
]);

/** `raw` (rawHeaders) without the hop-by-hop headers and those its Connection header names. */
function endToEnd(raw, drop = []) {
  const named = new Set(drop);
  for (let i = 0; i < raw.length; i += 2) {
    if (raw[i].toLowerCase() === 'connection') {
      for (const token of raw[i + 1].split(',')) named.add(token.trim().toLowerCase());
    }
  }
  const out = [];
  for (let i = 0; i < raw.length; i += 2) {
    const key = raw[i].toLowerCase();
    if (!HOP_BY_HOP.has(key) && !named.has(key)) out.push(raw[i], raw[i + 1]);
  }
  return out;
}

/** Methods the front may send to another replica after one failed once the request was sent. */
const SAFE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS']);

/**
 * The load balancer in front of the replicas, in the test process: every request (not every
 * connection) goes to the next replica in turn, on a connection of its own, with its method,
 * path and headers (Host included: presigned upload URLs name the front), its body streamed
 * there and the answer streamed back with its status and headers. A replica that refuses the
 * connection is skipped for the next one, as a health-checked balancer would; a failure
 * after the request went out is retried elsewhere only for a bodiless GET/HEAD/OPTIONS (as
 * nginx's proxy_next_upstream does not resend a POST), else answered 502. HTTP upgrades (the
 * agents' `GET /lodge/v1/node/connect`, `Upgrade: lodge-node/1`) are tunnelled the same way:
 * the request head written to the chosen replica, then both sockets piped.
 */
class Front {
  constructor(host, targets, mode, counts) {
    this.host = host;
    this.targets = targets; // the replicas: [{index, port}]
    this.mode = mode;
    this.next = 0;
    this.counts = counts; // requests sent to each replica (shared with the test's thread)
    this.tunnels = new Set();
    this.server = http.createServer();
    // Streams (uploads, RunBuild, log follow) may take as long as they take.
    this.server.requestTimeout = 0;
    this.server.timeout = 0;
    this.server.on('request', (req, res) => this.#request(req, res));
    this.server.on('upgrade', (req, socket, head) => this.#upgrade(req, socket, head));
    this.server.on('clientError', (_err, socket) => socket.destroy());
  }

  async listen(port = 0) {
    await new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, this.host, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
    return this.server.address().port;
  }

  async close() {
    for (const tunnel of this.tunnels) tunnel();
    this.server.closeAllConnections();
    await new Promise((resolve) => this.server.close(() => resolve()));
  }

  /** The replicas to try for one request, in order. */
  #order() {
    const { targets } = this;
    const first = this.mode === 'first' ? 0 : this.next++ % targets.length;
    return targets.map((_, i) => targets[(first + i) % targets.length]);
  }

  #count(target) {
    Atomics.add(this.counts, target.index, 1);
  }

  static #noReplica(err) {
    return JSON.stringify({ message: `lodge test front: no replica answered (${err?.code ?? err?.message ?? 'none'})` });
  }

  #request(req, res) {
    const order = this.#order();
    const headers = endToEnd(req.rawHeaders, ['expect']);
    const length = req.headers['content-length'];
    const bodiless = !req.headers['transfer-encoding'] && (length === undefined || length === '0');
    const replayable = bodiless && SAFE_METHODS.has(req.method);
    let answered = false;
    let clientGone = false;
    let current = null;
    res.on('close', () => {
      if (!res.writableFinished) {
        clientGone = true;
        current?.destroy();
      }
    });
    const fail = (err) => {
      if (clientGone) return;
      if (res.headersSent) {
        res.destroy();
        return;
      }
      const body = Front.#noReplica(err);
      res.writeHead(502, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
      res.end(body);
      req.resume(); // whatever of the body is left
    };
    const attempt = (i, lastError) => {
      if (clientGone) return;
      if (i >= order.length) {
        fail(lastError);
        return;
      }
      const target = order[i];
      let connected = false;
      const up = http.request({
        host: this.host,
        port: target.port,
        method: req.method,
        path: req.url,
        headers,
        agent: false, // a connection per request: the next request may go elsewhere
        setHost: !req.headers.host,
      });
      current = up;
      up.on('socket', (socket) => {
        const onConnect = () => {
          connected = true;
          this.#count(target);
          if (bodiless) {
            up.end();
            req.resume();
          } else {
            req.pipe(up);
          }
        };
        if (socket.connecting) socket.once('connect', onConnect);
        else onConnect();
      });
      up.on('response', (ur) => {
        answered = true;
        res.writeHead(ur.statusCode, ur.statusMessage, endToEnd(ur.rawHeaders));
        res.flushHeaders(); // a log follow may say nothing for a while
        ur.pipe(res);
        ur.on('close', () => {
          if (!ur.complete) res.destroy();
        });
      });
      up.on('error', (err) => {
        if (clientGone) return;
        if (answered) {
          res.destroy();
          return;
        }
        req.unpipe(up);
        if (!connected || replayable) attempt(i + 1, err);
        else fail(err);
      });
    };
    attempt(0);
  }

  #upgrade(req, socket, head) {
    const order = this.#order();
    const lines = [`${req.method} ${req.url} HTTP/${req.httpVersion}`];
    for (let i = 0; i < req.rawHeaders.length; i += 2) lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
    const requestHead = `${lines.join('\r\n')}\r\n\r\n`;
    socket.on('error', () => socket.destroy());
    const attempt = (i, lastError) => {
      if (socket.destroyed) return;
      if (i >= order.length) {
        const body = Front.#noReplica(lastError);
        socket.end(
          'HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\n' +
            `Content-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
        );
        return;
      }
      const target = order[i];
      const up = net.connect({ host: this.host, port: target.port });
      const refused = (err) => attempt(i + 1, err);
      up.once('error', refused);
      up.once('connect', () => {
        up.off('error', refused);
        this.#count(target);
        const destroy = () => {
          this.tunnels.delete(destroy);
          up.destroy();
          socket.destroy();
        };
        this.tunnels.add(destroy);
        // An error on either side ends both; a close ends the other side once it has
        // flushed (pipe ends it), or a moment later.
        const closed = () => setTimeout(destroy, 1000).unref();
        up.on('error', destroy);
        socket.on('error', destroy);
        up.on('close', closed);
        socket.on('close', closed);
        up.setNoDelay(true);
        socket.setNoDelay(true);
        up.write(requestHead);
        if (head?.length) up.write(head);
        socket.pipe(up);
        up.pipe(socket);
      });
    };
    attempt(0);
  }
}


const { host, ports, mode, counts } = workerData;
const front = new Front(host, ports.map((port, index) => ({ index, port })), mode, counts);
const port = await front.listen(workerData.port ?? 0);
parentPort.postMessage({ listening: port });
parentPort.on('message', async (msg) => {
  if (msg.close) {
    await front.close();
    process.exit(0);
  }
});
