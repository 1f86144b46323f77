//! Reading hostile tar streams with every piece of metadata bounded before it is read.
//!
//! The `tar` crate reads a GNU long-name entry or a pax header into memory whatever its size,
//! so a 1 MB upload can claim a 1 GiB name. Here entries are read raw, and the metadata
//! entries (GNU long names and links, pax extended and global headers) are checked against
//! small limits before a byte of them is read, then applied to the entry they describe. Every
//! entry, directories included, counts toward one limit.

use std::io::{self, Read};
use std::path::PathBuf;

/// Longest path or link name accepted (Linux's PATH_MAX).
pub const MAX_NAME: u64 = 4096;
/// Largest pax header accepted.
pub const MAX_PAX: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("{0}")]
    Format(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// One member of the archive with its real path and link target.
pub struct Member<'a, R: Read> {
    pub entry: tar::Entry<'a, R>,
    pub kind: tar::EntryType,
    pub path: PathBuf,
    pub link: Option<PathBuf>,
    /// The size of its data, as the header says.
    pub size: u64,
}

fn format(e: impl std::fmt::Display) -> TarError {
    TarError::Format(e.to_string())
}

fn read_bounded(
    entry: &mut impl Read,
    size: u64,
    max: u64,
    what: &str,
) -> Result<Vec<u8>, TarError> {
    if size > max {
        return Err(TarError::TooLarge(format!(
            "a {what} of {size} bytes (at most {max})"
        )));
    }
    let mut buf = Vec::with_capacity(size as usize);
    entry.take(size).read_to_end(&mut buf)?;
    if buf.len() as u64 != size {
        return Err(format(format!("a truncated {what}")));
    }
    Ok(buf)
}

fn path_of(bytes: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    PathBuf::from(std::ffi::OsStr::from_bytes(&bytes[..end]))
}

/// The records of a pax header (`LEN KEY=VALUE\n`), for the keys that matter here.
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
}

fn parse_pax(mut data: &[u8]) -> Result<Pax, TarError> {
    let mut pax = Pax::default();
    while !data.is_empty() {
        let space = data
            .iter()
            .position(|b| *b == b' ')
            .ok_or_else(|| format("a malformed pax record"))?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > space + 1 && *l <= data.len())
            .ok_or_else(|| format("a malformed pax record length"))?;
        let record = &data[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        let eq = record
            .iter()
            .position(|b| *b == b'=')
            .ok_or_else(|| format("a pax record without '='"))?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        match key {
            b"path" => pax.path = Some(value.to_vec()),
            b"linkpath" => pax.link = Some(value.to_vec()),
            b"size" => {
                pax.size = Some(
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| format("a bad pax size"))?,
                )
            }
            _ => {}
        }
        data = &data[len..];
    }
    Ok(pax)
}

/// Call `each` for every member of `archive` (metadata entries applied, not passed on), after
/// at most `max_entries` entries of any kind.
pub fn for_each<R: Read, E: From<TarError>>(
    archive: &mut tar::Archive<R>,
    max_entries: usize,
    mut each: impl FnMut(Member<'_, R>) -> Result<(), E>,
) -> Result<(), E> {
    let entries = archive.entries().map_err(format)?.raw(true);
    let mut count = 0usize;
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut pax = Pax::default();
    for entry in entries {
        let mut entry = entry.map_err(format)?;
        count += 1;
        if count > max_entries {
            return Err(TarError::TooLarge(format!("{max_entries} archive entries")).into());
        }
        let kind = entry.header().entry_type();
        let size = entry.header().entry_size().map_err(format)?;
        match kind {
            tar::EntryType::GNULongName => {
                long_name = Some(read_bounded(&mut entry, size, MAX_NAME + 1, "long name")?);
                continue;
            }
            tar::EntryType::GNULongLink => {
                long_link = Some(read_bounded(
                    &mut entry,
                    size,
                    MAX_NAME + 1,
                    "long link name",
                )?);
                continue;
            }
            tar::EntryType::XHeader => {
                pax = parse_pax(&read_bounded(&mut entry, size, MAX_PAX, "pax header")?)?;
                continue;
            }
            tar::EntryType::XGlobalHeader => {
                read_bounded(&mut entry, size, MAX_PAX, "pax global header")?;
                continue;
            }
            _ => {}
        }
        if pax.size.is_some_and(|s| s != size) {
            return Err(format("a pax size that differs from its header's (unsupported)").into());
        }
        let path = match pax.path.take().or(long_name.take()) {
            Some(p) => path_of(&p),
            None => path_of(&entry.header().path_bytes()),
        };
        let link = match pax.link.take().or(long_link.take()) {
            Some(l) => Some(path_of(&l)),
            None => entry.header().link_name_bytes().map(|l| path_of(&l)),
        };
        pax = Pax::default();
        for p in [Some(&path), link.as_ref()].into_iter().flatten() {
            if p.as_os_str().len() as u64 > MAX_NAME {
                return Err(
                    TarError::TooLarge(format!("a name longer than {MAX_NAME} bytes")).into(),
                );
            }
        }
        each(Member {
            entry,
            kind,
            path,
            link,
            size,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &[u8], kind: tar::EntryType, size: u64) -> [u8; 512] {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        *h.as_bytes()
    }

    fn walk(bytes: &[u8]) -> Result<Vec<PathBuf>, TarError> {
        let mut out = Vec::new();
        for_each::<_, TarError>(&mut tar::Archive::new(bytes), 10, |m| {
            out.push(m.path);
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn a_huge_long_name_is_refused_before_it_is_read() {
        let mut a = header(b"././@LongLink", tar::EntryType::GNULongName, 1 << 30).to_vec();
        a.extend([0u8; 1024]);
        let err = walk(&a).unwrap_err();
        assert!(matches!(err, TarError::TooLarge(_)), "{err}");
    }

    #[test]
    fn long_names_and_pax_paths_apply_to_the_next_entry() {
        let long = "d/".repeat(100) + "file";
        let mut a = header(
            b"././@LongLink",
            tar::EntryType::GNULongName,
            long.len() as u64,
        )
        .to_vec();
        a.extend(long.as_bytes());
        a.extend(vec![0u8; 512 - long.len() % 512]);
        a.extend(header(b"short", tar::EntryType::Regular, 0));
        let record = "path=pax/named\n";
        let rec = format!("{} {record}", record.len() + 3);
        a.extend(header(
            b"PaxHeader",
            tar::EntryType::XHeader,
            rec.len() as u64,
        ));
        a.extend(rec.as_bytes());
        a.extend(vec![0u8; 512 - rec.len()]);
        a.extend(header(b"ignored", tar::EntryType::Regular, 0));
        a.extend([0u8; 1024]);
        let paths = walk(&a).unwrap();
        assert_eq!(paths, vec![PathBuf::from(long), PathBuf::from("pax/named")]);
    }

    #[test]
    fn every_entry_counts() {
        let mut a = Vec::new();
        for i in 0..11 {
            a.extend(header(
                format!("dir{i}/").as_bytes(),
                tar::EntryType::Directory,
                0,
            ));
        }
        a.extend([0u8; 1024]);
        assert!(matches!(walk(&a).unwrap_err(), TarError::TooLarge(_)));
    }

    #[test]
    fn a_huge_pax_header_is_refused() {
        let mut a = header(b"PaxHeader", tar::EntryType::XHeader, 1 << 40).to_vec();
        a.extend([0u8; 1024]);
        assert!(matches!(walk(&a).unwrap_err(), TarError::TooLarge(_)));
    }
}
