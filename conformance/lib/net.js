// Several "hosts" on one machine: network namespaces on a bridge the test creates, with
// private addresses no route of the machine uses. Every name is unique to the test run.

import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';

export const ip = (...args) => execFileSync('ip', args, { stdio: ['ignore', 'pipe', 'pipe'] }).toString();
const tryIp = (...args) => {
  try {
    ip(...args);
  } catch {
    // already gone
  }
};

/** A /24 on BASE.N.0 (BASE: two octets) that no route of this machine uses. */
function freeSubnet(base) {
  const routes = ip('-4', 'route', 'show');
  for (let i = 0; i < 50; i++) {
    const n = crypto.randomInt(1, 255);
    if (!routes.includes(`${base}.${n}.`)) return `${base}.${n}`;
  }
  throw new Error(`no free ${base}.N.0/24`);
}

/**
 * A bridge on this machine and network namespaces ("hosts") on it, each with an address of
 * its own: names start with `prefix` and a random id; `teardown` removes them all (call it in
 * `after`, so that it also runs after a failure).
 */
export class Net {
  constructor(prefix, base) {
    this.prefix = prefix;
    this.id = crypto.randomBytes(2).toString('hex');
    this.subnet = freeSubnet(base);
    this.bridge = `${prefix}br${this.id}`;
    this.hosts = [];
    ip('link', 'add', this.bridge, 'type', 'bridge');
    ip('addr', 'add', `${this.gateway}/24`, 'dev', this.bridge);
    ip('link', 'set', this.bridge, 'up');
  }

  get gateway() {
    return `${this.subnet}.1`;
  }

  addHost(i) {
    const ns = `${this.prefix}h${this.id}${i}`;
    const outer = `${this.prefix}v${this.id}${i}`;
    const inner = `${this.prefix}p${this.id}${i}`;
    const addr = `${this.subnet}.${10 + i}`;
    ip('netns', 'add', ns);
    this.hosts.push({ ns, outer, addr });
    ip('link', 'add', outer, 'type', 'veth', 'peer', 'name', inner);
    ip('link', 'set', inner, 'netns', ns);
    ip('link', 'set', outer, 'master', this.bridge, 'up');
    ip('-n', ns, 'addr', 'add', `${addr}/24`, 'dev', inner);
    ip('-n', ns, 'link', 'set', inner, 'up');
    ip('-n', ns, 'link', 'set', 'lo', 'up');
    ip('-n', ns, 'route', 'add', 'default', 'via', this.gateway);
    return { ns, outer, addr };
  }

  /** Cut (or restore) one host's cable. */
  setLink(host, up) {
    ip('link', 'set', host.outer, up ? 'up' : 'down');
  }

  teardown() {
    for (const h of this.hosts) {
      // Whatever still runs in the namespace (game servers outlive agents by design).
      let pids = '';
      try {
        pids = ip('netns', 'pids', h.ns).trim();
      } catch {
        // no such namespace
      }
      for (const pid of pids.split('\n').filter(Boolean)) {
        try {
          process.kill(Number(pid), 'SIGKILL');
        } catch {
          // gone
        }
      }
      tryIp('link', 'del', h.outer);
      tryIp('netns', 'del', h.ns);
    }
    tryIp('link', 'del', this.bridge);
  }
}

