//! Packing a directory into a build archive: regular files only, paths relative to the
//! directory with `/` separators, honouring `.dockerignore` and `.gitignore` files.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// One ignore rule.
#[derive(Debug, Clone)]
struct Rule {
    /// Directory (relative to the root, `/`-separated, empty for the root) the rule lives in.
    base: String,
    pattern: String,
    negate: bool,
    dir_only: bool,
    /// Matched against the whole path below `base`; otherwise against the file name.
    anchored: bool,
    /// From `.dockerignore`: it also matches everything below a matching directory, so a later
    /// `!` rule can bring back a file inside an excluded directory (Docker's semantics). A
    /// `.gitignore` rule matches the path itself only, and nothing below a directory git
    /// excludes can be re-included.
    docker: bool,
}

impl Rule {
    /// `rel` below this rule's base directory, if it is below it.
    fn below<'a>(&self, rel: &'a str) -> Option<&'a str> {
        if self.base.is_empty() {
            Some(rel)
        } else {
            rel.strip_prefix(&self.base)
                .and_then(|s| s.strip_prefix('/'))
        }
    }

    /// Whether the pattern matches `rel` itself.
    fn matches_path(&self, rel: &str, is_dir: bool) -> bool {
        if self.dir_only && !is_dir {
            return false;
        }
        let Some(below) = self.below(rel) else {
            return false;
        };
        let subject = if self.anchored {
            below
        } else {
            below.rsplit('/').next().unwrap_or(below)
        };
        glob(self.pattern.as_bytes(), subject.as_bytes())
    }

    /// Whether the rule applies to `rel`: the path itself, or for a Docker rule also one of
    /// its parent directories.
    fn matches(&self, rel: &str, is_dir: bool) -> bool {
        if self.matches_path(rel, is_dir) {
            return true;
        }
        self.docker
            && rel
                .match_indices('/')
                .any(|(i, _)| self.matches_path(&rel[..i], true))
    }

    /// Whether the pattern could match some path strictly below the directory `dir`.
    fn could_match_below(&self, dir: &str) -> bool {
        let Some(below) = self.below(dir) else {
            return false;
        };
        let pattern: Vec<&str> = self.pattern.split('/').collect();
        let dir: Vec<&str> = below.split('/').collect();
        for (i, d) in dir.iter().enumerate() {
            match pattern.get(i) {
                Some(p) if p.contains("**") => return true,
                Some(p) if glob(p.as_bytes(), d.as_bytes()) => {}
                _ => return false,
            }
        }
        pattern.len() > dir.len()
    }
}

/// The outcome of the rules for one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Kept,
    Excluded { by_git: bool },
}

/// `.dockerignore` and `.gitignore` rules, in order: the last matching rule wins.
#[derive(Debug, Default, Clone)]
pub struct Ignore {
    rules: Vec<Rule>,
}

impl Ignore {
    /// Add the rules of an ignore file found in `base`. Docker's rules are always anchored at
    /// the root; git's are anchored when they contain a `/` other than a trailing one.
    pub fn add(&mut self, base: &str, text: &str, docker: bool) {
        for line in text.lines() {
            let line = line.trim_end();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (negate, line) = match line.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, line),
            };
            let dir_only = line.ends_with('/');
            let mut pattern = line.trim_end_matches('/').to_string();
            if docker {
                pattern = pattern.trim_start_matches("./").to_string();
            }
            let anchored = docker || pattern.contains('/');
            let pattern = pattern.trim_start_matches('/').to_string();
            if pattern.is_empty() {
                continue;
            }
            self.rules.push(Rule {
                base: base.to_string(),
                pattern,
                negate,
                dir_only,
                anchored,
                docker,
            });
        }
    }

    fn verdict(&self, rel: &str, is_dir: bool) -> Verdict {
        let mut v = Verdict::Kept;
        for r in &self.rules {
            if r.matches(rel, is_dir) {
                v = if r.negate {
                    Verdict::Kept
                } else {
                    Verdict::Excluded { by_git: !r.docker }
                };
            }
        }
        v
    }

    /// Whether `rel` (relative to the root, `/`-separated) is excluded.
    pub fn ignored(&self, rel: &str, is_dir: bool) -> bool {
        self.verdict(rel, is_dir) != Verdict::Kept
    }

    /// Whether the walk must enter the directory `rel`: it is kept, or Docker excluded it but a
    /// `.dockerignore` exception (`!pattern`) may bring back something inside it.
    fn descend(&self, rel: &str) -> bool {
        match self.verdict(rel, true) {
            Verdict::Kept => true,
            Verdict::Excluded { by_git: true } => false,
            Verdict::Excluded { by_git: false } => self
                .rules
                .iter()
                .any(|r| r.docker && r.negate && r.could_match_below(rel)),
        }
    }
}

/// Glob with `*` and `?` (not crossing `/`) and `**` (crossing directories).
pub fn glob(p: &[u8], s: &[u8]) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some(b'*') if p.get(1) == Some(&b'*') => {
            let rest = if p.get(2) == Some(&b'/') {
                &p[3..]
            } else {
                &p[2..]
            };
            (0..=s.len())
                .any(|i| (i == 0 || s[i - 1] == b'/' || rest.is_empty()) && glob(rest, &s[i..]))
        }
        Some(b'*') => {
            let mut i = 0;
            loop {
                if glob(&p[1..], &s[i..]) {
                    return true;
                }
                if i == s.len() || s[i] == b'/' {
                    return false;
                }
                i += 1;
            }
        }
        Some(b'?') => !s.is_empty() && s[0] != b'/' && glob(&p[1..], &s[1..]),
        Some(c) => s.first() == Some(c) && glob(&p[1..], &s[1..]),
    }
}

/// The files to pack, relative to `root`, sorted.
pub fn collect(root: &Path) -> io::Result<Vec<String>> {
    let mut ignore = Ignore::default();
    if let Ok(t) = fs::read_to_string(root.join(".dockerignore")) {
        ignore.add("", &t, true);
    }
    let mut out = Vec::new();
    walk(root, "", &mut ignore, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, rel: &str, ignore: &mut Ignore, out: &mut Vec<String>) -> io::Result<()> {
    if let Ok(t) = fs::read_to_string(dir.join(".gitignore")) {
        ignore.add(rel, &t, false);
    }
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let ft = e.file_type()?;
        if ft.is_dir() {
            if name == ".git" || !ignore.descend(&path) {
                continue;
            }
            walk(&e.path(), &path, ignore, out)?;
        } else if ft.is_file() && !ignore.ignored(&path, false) {
            out.push(path);
        }
    }
    Ok(())
}

/// A gzip-compressed tar of `files` (relative to `root`).
pub fn tar_gz(root: &Path, files: &[String]) -> io::Result<Vec<u8>> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    b.mode(tar::HeaderMode::Deterministic);
    for f in files {
        let mut file = fs::File::open(root.join(PathBuf::from(f)))?;
        b.append_file(f, &mut file)?;
    }
    b.into_inner()?.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob(b"*.log", b"a.log"));
        assert!(!glob(b"*.log", b"dir/a.log"));
        assert!(glob(b"**/*.log", b"dir/sub/a.log"));
        assert!(glob(b"**/*.log", b"a.log"));
        assert!(glob(b"build/**", b"build/x/y"));
        assert!(glob(b"a/**/b", b"a/b"));
        assert!(glob(b"a/**/b", b"a/x/y/b"));
        assert!(glob(b"?.txt", b"x.txt"));
        assert!(!glob(b"?.txt", b"xy.txt"));
    }

    #[test]
    fn ignore_rules() {
        let mut i = Ignore::default();
        i.add(
            "",
            "# comment\n*.log\n/target/\nnode_modules\n!keep.log\n",
            false,
        );
        i.add("sub", "secret.txt\n", false);
        assert!(i.ignored("a.log", false));
        assert!(
            i.ignored("deep/b.log", false),
            "unanchored git rules match at any depth"
        );
        assert!(!i.ignored("keep.log", false), "negation wins when last");
        assert!(i.ignored("target", true));
        assert!(!i.ignored("src/target", true), "a leading slash anchors");
        assert!(
            !i.ignored("target", false),
            "a trailing slash means directories only"
        );
        assert!(i.ignored("x/node_modules", true));
        assert!(i.ignored("sub/secret.txt", false));
        assert!(
            !i.ignored("secret.txt", false),
            "nested rules apply below their directory"
        );
        let mut d = Ignore::default();
        d.add("", "*.md\n**/*.tmp\n", true);
        assert!(d.ignored("README.md", false));
        assert!(
            !d.ignored("docs/guide.md", false),
            "docker rules are anchored at the root"
        );
        assert!(d.ignored("a/b.tmp", false));
    }

    #[test]
    fn docker_exceptions_inside_excluded_directories() {
        let mut d = Ignore::default();
        d.add(
            "",
            "assets\n!assets/keep.txt\n!assets/sub/**/*.png\nlogs/**\ntmp\n",
            true,
        );
        assert!(d.ignored("assets", true));
        assert!(
            d.ignored("assets/other.txt", false),
            "a parent match excludes"
        );
        assert!(
            !d.ignored("assets/keep.txt", false),
            "the exception wins when last"
        );
        assert!(!d.ignored("assets/sub/x/y.png", false));
        assert!(d.ignored("assets/sub/x/y.jpg", false));
        assert!(d.descend("assets"), "an exception may match inside");
        assert!(d.descend("assets/sub"));
        assert!(!d.descend("assets/other"), "no exception can match inside");
        assert!(d.ignored("logs/a/b", false));
        assert!(!d.descend("tmp"), "no exception at all");
        let mut last = Ignore::default();
        last.add("", "!assets/keep.txt\nassets\n", true);
        assert!(
            last.ignored("assets/keep.txt", false),
            "an exclusion after the exception wins"
        );
        let mut git = d.clone();
        git.add("", "assets/\n", false);
        assert!(
            !git.descend("assets"),
            "git cannot re-include below a directory it excludes"
        );
    }

    #[test]
    fn collects_and_packs_regular_files() {
        let root = std::env::temp_dir().join(format!("lodge-pack-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("src/deep")).unwrap();
        fs::create_dir_all(root.join(".git")).unwrap();
        fs::create_dir_all(root.join("target")).unwrap();
        fs::write(root.join("lodge.toml"), "command = [\"x\"]").unwrap();
        fs::write(root.join("src/deep/a.py"), "print(1)").unwrap();
        fs::write(root.join(".git/HEAD"), "ref").unwrap();
        fs::write(root.join("target/big"), "x").unwrap();
        fs::write(root.join("notes.md"), "x").unwrap();
        fs::write(root.join(".gitignore"), "target/\n").unwrap();
        fs::write(
            root.join(".dockerignore"),
            "*.md\nassets\n!assets/keep/*.txt\n",
        )
        .unwrap();
        fs::create_dir_all(root.join("assets/keep")).unwrap();
        fs::write(root.join("assets/big.png"), "x").unwrap();
        fs::write(root.join("assets/keep/a.txt"), "x").unwrap();
        fs::write(root.join("assets/keep/b.png"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        let files = collect(&root).unwrap();
        assert_eq!(
            files,
            vec![
                ".dockerignore",
                ".gitignore",
                "assets/keep/a.txt",
                "lodge.toml",
                "src/deep/a.py"
            ]
        );
        let tgz = tar_gz(&root, &files).unwrap();
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(&tgz[..]));
        let names: Vec<String> = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, files);
        let _ = fs::remove_dir_all(&root);
    }
}
