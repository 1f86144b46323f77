//! CPU placement for the data-plane benchmarks: a round trip costs about five times more when
//! client and server share a CPU on these VMs, so each path is measured unpinned, with client and
//! server on the same CPU, and split across two.

use lodge_agent::sys;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The scheduler decides.
    Unpinned,
    /// Client and every server-side process on CPU 0.
    SameCpu,
    /// Client on CPU 0, the server side on CPU 1.
    Split,
}

impl Placement {
    /// The placements this machine can offer.
    pub fn all() -> Vec<Placement> {
        if cpus() >= 2 {
            vec![Placement::Unpinned, Placement::SameCpu, Placement::Split]
        } else {
            vec![Placement::Unpinned]
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Placement::Unpinned => "unpinned",
            Placement::SameCpu => "same CPU",
            Placement::Split => "split",
        }
    }

    fn client_cpu(self) -> Option<usize> {
        match self {
            Placement::Unpinned => None,
            Placement::SameCpu | Placement::Split => Some(0),
        }
    }

    fn server_cpu(self) -> Option<usize> {
        match self {
            Placement::Unpinned => None,
            Placement::SameCpu => Some(0),
            Placement::Split => Some(1),
        }
    }

    /// Pin every thread of `servers` and of their descendants; undone by [`Placement::release`].
    pub fn place_servers(self, servers: &[u32]) {
        for &pid in servers {
            for p in std::iter::once(pid).chain(sys::descendants(pid)) {
                pin_process(p, self.server_cpu());
            }
        }
    }

    /// Pin the calling thread (the client's).
    pub fn place_client(self) {
        set_affinity(0, self.client_cpu());
    }

    /// Every CPU again for `servers` and the calling thread.
    pub fn release(servers: &[u32]) {
        Placement::Unpinned.place_servers(servers);
        Placement::Unpinned.place_client();
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Every thread of a process.
fn pin_process(pid: u32, cpu: Option<usize>) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            set_affinity(tid, cpu);
        }
    }
}

/// One thread (`0`: the calling one) on `cpu`, or on every CPU.
fn set_affinity(tid: i32, cpu: Option<usize>) {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write within it, and
    // sched_setaffinity reads it for a thread id we name (a failure only leaves it as it was).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        match cpu {
            Some(c) => libc::CPU_SET(c, &mut set),
            None => {
                for c in 0..cpus() {
                    libc::CPU_SET(c, &mut set);
                }
            }
        }
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
