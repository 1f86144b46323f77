//! Mutation fuzzing of the parsers that take hostile bytes: archive unpacking, `lodge.toml`,
//! and the HTTP API (JSON bodies, the legacy request shapes, the multipart upload reader).
//!
//! Each target starts from its corpus in `tests/fuzz-corpus/<target>/` and mutates it with a
//! seeded generator (bit flips, byte edits, splices, interesting numbers), so a run is
//! reproducible. `LODGE_FUZZ_ITERS` sets the iterations per target (CI runs the default, a
//! short pass; a session runs hundreds of thousands), `LODGE_FUZZ_SEED` the seed. An input
//! that breaks a property is written to `target/fuzz-failures/` and the test fails.

use std::path::{Path, PathBuf};

use lodge_artifact::bundle::{self, Limits, Manifest};
use serde_json::{json, Value};

use crate::TempDir;

fn iterations(default: usize) -> usize {
    std::env::var("LODGE_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: small, fast and seeded.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::env::var("LODGE_FUZZ_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0x5eed_1a7e_u64);
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&[u8]] = &[
    b"0",
    b"-1",
    b"4294967296",
    b"99999999999999999999",
    b"1e308",
    b"null",
    b"\"\"",
    b"[]",
    b"{}",
    b"\x00",
    b"\xff\xfe",
    b"../",
    b"/etc/passwd",
    b"%00",
    b"\r\n\r\n",
    b"--",
    b"=",
];

fn mutate(input: &[u8], corpus: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(7) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(out.len() + 1);
                let v = INTERESTING[rng.below(INTERESTING.len())];
                out.splice(i..i, v.iter().copied());
            }
            3 if !out.is_empty() => {
                let i = rng.below(out.len());
                let n = rng.below(out.len() - i + 1).min(64);
                out.drain(i..i + n);
            }
            4 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let at = rng.below(out.len() + 1);
                    let from = rng.below(other.len());
                    let n = rng.below(other.len() - from).min(512);
                    out.splice(at..at, other[from..from + n].iter().copied());
                }
            }
            5 if !out.is_empty() => {
                // Repeat a slice: long names, deep nesting, many entries.
                let i = rng.below(out.len());
                let n = rng.below(out.len() - i).min(32) + 1;
                let piece = out[i..(i + n).min(out.len())].to_vec();
                for _ in 0..rng.below(16) {
                    out.splice(i..i, piece.iter().copied());
                }
            }
            _ => out.truncate(rng.below(out.len() + 1)),
        }
    }
    out
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(target)
}

fn load_corpus(target: &str, seeds: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut corpus = seeds;
    if let Ok(entries) = std::fs::read_dir(corpus_dir(target)) {
        let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        corpus.extend(files.iter().filter_map(|p| std::fs::read(p).ok()));
    }
    assert!(!corpus.is_empty(), "no corpus for {target}");
    corpus
}

fn failed(target: &str, input: &[u8], why: &str) -> ! {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("{target}-{}", lodge_model::id::secret_hex()));
    let _ = std::fs::write(&file, input);
    panic!("fuzz {target}: {why}; input saved to {}", file.display());
}

/// Seed archives: a plain file, a GNU long name, a pax path, directories, a symlink.
fn archive_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let entry = |b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], kind: tar::EntryType| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        b.append_data(&mut h, path, data).unwrap();
    };
    let mut b = tar::Builder::new(Vec::new());
    entry(
        &mut b,
        "lodge.toml",
        b"command = [\"./run\"]\n[env]\nA = \"1\"\n",
        tar::EntryType::Regular,
    );
    entry(&mut b, "dir/", b"", tar::EntryType::Directory);
    entry(
        &mut b,
        &format!("dir/{}", "n".repeat(150)),
        b"long",
        tar::EntryType::Regular,
    );
    seeds.push(b.into_inner().unwrap());
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "link", "dir/target").unwrap();
    entry(&mut b, "dir/target", b"x", tar::EntryType::Regular);
    seeds.push(b.into_inner().unwrap());
    seeds
}

/// Every path under `root`, to check nothing was written outside the destination.
fn tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&p) {
            for e in entries.flatten() {
                out.push(e.path());
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    out
}

#[test]
fn fuzz_archive_unpacking() {
    let corpus = load_corpus("archive", archive_seeds());
    let mut rng = Rng::new();
    let tmp = TempDir::new("fuzz-archive");
    let limits = Limits {
        max_files: 200,
        max_total_bytes: 1 << 20,
        max_dirs: 50,
    };
    for i in 0..iterations(1500) {
        let input = mutate(&corpus[i % corpus.len()], &corpus, &mut rng);
        let dest = tmp.0.join(format!("out{}", i % 4)).join("bundle");
        let _ = std::fs::remove_dir_all(dest.parent().unwrap());
        std::fs::create_dir_all(&dest).unwrap();
        let result = std::panic::catch_unwind(|| bundle::unpack_tar(&input[..], &dest, limits));
        let Ok(result) = result else {
            failed("archive", &input, "panicked");
        };
        // Whatever it decided, nothing lands outside the destination, and nothing but
        // directories and regular files inside it (links become copies).
        for p in tree(dest.parent().unwrap()) {
            if !p.starts_with(&dest) && p != dest {
                failed("archive", &input, &format!("wrote {} outside", p.display()));
            }
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if !(meta.is_dir() || meta.is_file()) {
                failed(
                    "archive",
                    &input,
                    &format!("left {} that is neither file nor dir", p.display()),
                );
            }
        }
        if let Ok((files, bytes)) = result {
            if files > limits.max_files || bytes > limits.max_total_bytes {
                failed("archive", &input, "went past its limits");
            }
        }
    }
}

#[test]
fn fuzz_lodge_toml() {
    let seeds = vec![
        b"command = [\"python3\", \"server.py\", \"--port\", \"{port}\"]\n[env]\nTICK_RATE = \"60\"\n"
            .to_vec(),
        b"command = [\"./gs\", \"{port:debug}\"]\n".to_vec(),
    ];
    let corpus = load_corpus("manifest", seeds);
    let mut rng = Rng::new();
    for i in 0..iterations(20_000) {
        let input = mutate(&corpus[i % corpus.len()], &corpus, &mut rng);
        let text = String::from_utf8_lossy(&input);
        match std::panic::catch_unwind(|| Manifest::parse(&text)) {
            Err(_) => failed("manifest", &input, "panicked"),
            Ok(Ok(m)) => {
                if m.command.is_empty()
                    || m.command.len() > bundle::MAX_ARGS
                    || m.env.len() > bundle::MAX_ENV
                {
                    failed("manifest", &input, "accepted a manifest outside its bounds");
                }
            }
            Ok(Err(_)) => {}
        }
    }
}

/// Requests against a live API: (method, path template, body seed). `{app}` is a real app.
fn api_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    vec![
        ("POST", "/apps/v2/apps", br#"{"appName":"fuzz","authConfiguration":{"anonymous":{}}}"#.to_vec()),
        ("POST", "/rooms/v2/{app}/create", br#"{"region":"London","roomConfig":"x"}"#.to_vec()),
        ("POST", "/rooms/v1/{app}/create", br#"{"region":"London"}"#.to_vec()),
        ("POST", "/deployments/v3/apps/{app}/deployments", br#"{"buildId":"b","idleTimeoutEnabled":true,"env":[{"name":"A","value":"1"}],"roomsPerProcess":2,"transportType":"udp","containerPort":7777,"requestedCPU":0.5,"requestedMemoryMB":512,"additionalContainerPorts":[{"name":"debug","port":8000,"transportType":"tcp"}]}"#.to_vec()),
        ("POST", "/deployments/v1/{app}/create/1", br#"{"planName":"tiny","transportType":"udp","containerPort":4000,"roomsPerProcess":3,"env":[]}"#.to_vec()),
        ("POST", "/deployments/v2/{app}/create/1", br#"{"planName":"small","transportType":"tcp","containerPort":4000,"roomsPerProcess":3,"env":[],"idleTimeoutEnabled":false,"additionalContainerPorts":[]}"#.to_vec()),
        ("POST", "/builds/v3/builds", br#"{"buildSizeInBytes":1000,"buildTag":"t"}"#.to_vec()),
        ("POST", "/builds/v1/{app}/create", br#"{"buildTag":"t"}"#.to_vec()),
        ("POST", "/builds/v2/{app}/createWithMultipartUploads", br#"{"buildSizeInBytes":1000}"#.to_vec()),
        ("POST", "/builds/v1/{app}/run/1", b"\r\n--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.tgz\"\r\n\r\nxyz\r\n--B--\r\n".to_vec()),
        ("POST", "/tokens/v1/orgs/{org}/create", br#"{"name":"t","scopes":["builds:read"]}"#.to_vec()),
        ("POST", "/apps/v1/create", br#"{"appName":"legacy","authConfiguration":{}}"#.to_vec()),
        ("POST", "/lodge/v1/orgs", br#"{"name":"o"}"#.to_vec()),
        ("PATCH", "/apps/v2/apps/{app}", br#"{"serviceConfig":{"staticProcessAllocation":[{"region":"London","minProcesses":0,"targetProcesses":0,"maxProcesses":1}]}}"#.to_vec()),
        ("POST", "/lobby/v2/{app}/setState/r", br#"{"state":{"a":1}}"#.to_vec()),
    ]
}

#[tokio::test]
async fn fuzz_api_bodies() {
    let dir = TempDir::new("fuzz-api");
    let url = crate::api::serve(&dir.0).await;
    let http = reqwest::Client::new();
    let (_, orgs) = crate::api::call(&url, "GET", "/orgs/v1", "admin", None).await;
    let org = orgs["orgs"][0]["orgId"].as_str().unwrap().to_string();
    let (_, app) = crate::api::call(
        &url,
        "POST",
        "/apps/v2/apps",
        "admin",
        Some(json!({"appName": "fuzzed", "authConfiguration": {}})),
    )
    .await;
    let app_id = app["appId"].as_str().unwrap().to_string();
    let seeds = api_seeds();
    let mut corpus: Vec<Vec<u8>> = seeds.iter().map(|(_, _, b)| b.clone()).collect();
    corpus.extend(load_corpus("api", Vec::new()).into_iter());
    let mut rng = Rng::new();
    for i in 0..iterations(1500) {
        let (method, template, seed) = &seeds[i % seeds.len()];
        let body = mutate(seed, &corpus, &mut rng);
        let path = template.replace("{app}", &app_id).replace("{org}", &org);
        let mut req = http
            .request(method.parse().unwrap(), format!("{url}{path}"))
            .bearer_auth("admin")
            .body(body.clone());
        req = if template.contains("/run/") {
            req.header("content-type", "multipart/form-data; boundary=B")
        } else {
            req.header("content-type", "application/json")
        };
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let ct = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let text = res.text().await.unwrap_or_default();
        let mut input = format!("{method} {path}\n").into_bytes();
        input.extend(&body);
        if status >= 500 {
            failed("api", &input, &format!("answered {status}: {text}"));
        }
        if status >= 400
            && !(ct.starts_with("application/json")
                && serde_json::from_str::<Value>(&text).is_ok_and(|v| v["message"].is_string()))
        {
            failed(
                "api",
                &input,
                &format!("a {status} without a JSON message: {text}"),
            );
        }
    }
}
