//! Downloads from the Hugging Face Hub into the local cache, in the layout `huggingface_hub`
//! writes (`blobs/<etag>`, `snapshots/<commit>/<file>` → relative symlink to the blob,
//! `refs/<revision>` = commit), so the Python tools and qlora share one cache.
//!
//! # What is guaranteed
//!
//! - **Nothing incomplete is ever taken for complete.** A file is streamed into
//!   `blobs/<etag>.incomplete` (the name `huggingface_hub` uses, so either tool resumes the
//!   other's partial file); only when it has exactly the size the Hub announced *and* the hash the
//!   Hub announced is it fsynced and renamed to `blobs/<etag>`, and only then is the snapshot
//!   symlink created (itself atomically: a temporary link renamed into place). A process killed at
//!   any moment leaves at worst a `.incomplete` file, which no reader looks at.
//! - **Interrupted downloads resume.** A connection that drops mid-file is retried in-process
//!   (up to [`ATTEMPTS`] times) with an HTTP `Range` request from the bytes already on disk; if
//!   it keeps failing the partial file stays, and the next run resumes it. A server that ignores
//!   `Range` (status 200) restarts the file from zero; a partial file longer than the announced
//!   size is discarded.
//! - **Sizes and hashes are checked.** The repo listing is requested with `?blobs=true`, which
//!   gives each file's size and, for LFS files (weights), its SHA-256; for small git-stored files
//!   (configs, tokenizers) the git blob id, a SHA-1 over `blob <len>\0<content>`. Where a mirror's
//!   listing lacks them, the `resolve` response headers are used (`X-Linked-Size` /
//!   `Content-Range`, and an `ETag` that is a SHA-256 is checked as one). More bytes than
//!   announced, fewer, or a wrong hash: the partial file is removed and the error says so; a
//!   resumed file whose hash is wrong is fetched once more from scratch.
//! - **Hostile listings are refused:** file names that are not plain relative paths, blob names or
//!   commits that are not plain tokens, listings over 64 MiB.
//! - **One writer per blob:** `blobs/<etag>.lock` is held (`flock`) while a blob is written, so two
//!   processes fetching the same model do not interleave bytes.

mod blob;
mod client;

use super::{check_dataset_dir, check_model_dir, index_shards, HubEnv, HubId, RepoKind};
use super::{repo_cache_dir, MODEL_EXTRA_FILES};
use crate::data;
use crate::error::{Error, Result};
use blob::{incomplete_path, link, snapshot_root, sync_dir, verify, write_ref, BlobLock};
use client::{is_plain_relative, is_token, Announced, Client, Listing};
use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Attempts per file within one run (the first try plus resumes after a dropped connection).
pub const ATTEMPTS: usize = 3;

/// Downloads what `id` needs into the cache and returns its snapshot folder.
pub(super) fn fetch(id: &HubId, kind: RepoKind, env: &HubEnv) -> Result<PathBuf> {
    let client = Client::new(id, kind, env);
    let listing = client.listing()?;
    let repo = repo_cache_dir(&env.cache_dir, kind, &id.id);
    let mut fetcher = Fetcher {
        client: &client,
        repo,
        listing,
    };
    match kind {
        RepoKind::Model => fetcher.model(),
        RepoKind::Dataset => fetcher.dataset(),
    }
}

struct Fetcher<'a> {
    client: &'a Client,
    repo: PathBuf,
    listing: Listing,
}

impl Fetcher<'_> {
    fn model(&mut self) -> Result<PathBuf> {
        let c = self.client;
        let id = &c.id;
        let has: HashSet<String> = self.listing.files.iter().cloned().collect();
        if !has.contains("config.json") {
            return Err(c.err("the repo has no config.json"));
        }
        let config = self.get("config.json")?;
        if !has.contains("tokenizer.json") {
            tracing::warn!("{id}: the repo has no tokenizer.json");
        }
        for file in MODEL_EXTRA_FILES.iter().filter(|f| has.contains(**f)) {
            self.get(file)?;
        }
        if has.contains("model.safetensors") {
            self.get("model.safetensors")?;
        } else if has.contains("model.safetensors.index.json") {
            let index = self.get("model.safetensors.index.json")?;
            let shards = index_shards(&index).map_err(|e| c.err(e))?;
            for shard in &shards {
                if !is_plain_relative(shard) {
                    return Err(c.err(format!(
                        "the shard index names {shard:?}, which is not a relative path inside the repo"
                    )));
                }
                self.get(shard)?;
            }
        } else {
            return Err(c.err(
                "the repo has neither model.safetensors nor model.safetensors.index.json \
                 (only safetensors checkpoints are supported)",
            ));
        }
        let dir = snapshot_root(&config, "config.json");
        check_model_dir(&dir).map_err(|why| c.err(format!("after download, {why}")))?;
        Ok(dir)
    }

    fn dataset(&mut self) -> Result<PathBuf> {
        let c = self.client;
        let chosen = data::select_data_files(&self.listing.files);
        if chosen.is_empty() {
            let some: Vec<&str> = self
                .listing
                .files
                .iter()
                .take(12)
                .map(String::as_str)
                .collect();
            return Err(c.err(format!(
                "no data files ({}) in the repo (files: {})",
                data::SUPPORTED_FORMATS,
                some.join(", ")
            )));
        }
        let mut root = None;
        for file in &chosen {
            let path = self.get(file)?;
            root.get_or_insert_with(|| snapshot_root(&path, file));
        }
        let dir = root.expect("at least one file fetched");
        check_dataset_dir(&dir).map_err(|why| c.err(format!("after download, {why}")))?;
        Ok(dir)
    }

    /// The snapshot path of `file`, downloading it unless a complete copy is cached.
    fn get(&mut self, file: &str) -> Result<PathBuf> {
        let c = self.client;
        let mut announced = self
            .listing
            .announced
            .get(file)
            .cloned()
            .unwrap_or_default();
        let mut commit = self.listing.commit.clone();
        let mut blob_name = announced.etag().map(str::to_owned);
        if blob_name.is_none() || announced.size.is_none() || commit.is_empty() {
            // A listing without sizes / blob ids (an older mirror): ask the file itself.
            let head = c.head(file)?;
            if commit.is_empty() {
                commit = head.commit.unwrap_or_default();
            }
            announced.size = announced.size.or(head.announced.size);
            if announced.etag().is_none() {
                announced.sha256 = head.announced.sha256;
                announced.git_sha1 = head.announced.git_sha1;
            }
            blob_name = announced.etag().map(str::to_owned).or(head.etag);
        }
        if commit.is_empty() || !is_token(&commit) {
            return Err(c.err(format!(
                "{file}: the Hub named no usable commit for revision {}",
                c.id.revision()
            )));
        }
        let Some(blob_name) = blob_name.filter(|b| is_token(b)) else {
            return Err(c.err(format!(
                "{file}: the Hub announced no usable ETag (blob name) for it"
            )));
        };
        let Some(size) = announced.size else {
            return Err(c.err(format!("{file}: the Hub announced no size for it")));
        };
        let pointer = self.repo.join("snapshots").join(&commit).join(file);
        let blob = self.repo.join("blobs").join(&blob_name);
        let io = |p: &Path, e: std::io::Error| Error::io(p, e);

        // A complete cached copy: the blob exists with the announced size (blobs are renamed into
        // place only after their hash was checked, by us or by huggingface_hub).
        let blob_ok = std::fs::metadata(&blob).is_ok_and(|m| m.is_file() && m.len() == size);
        if !blob_ok {
            std::fs::create_dir_all(blob.parent().expect("blob has a parent"))
                .map_err(|e| io(&blob, e))?;
            let _lock = BlobLock::acquire(&blob).map_err(|e| c.err(e))?;
            // Another process may have finished it while we waited.
            if !std::fs::metadata(&blob).is_ok_and(|m| m.is_file() && m.len() == size) {
                self.download(file, &blob, size, &announced)?;
            }
        }
        link(&blob, &pointer, file).map_err(|e| io(&pointer, e))?;
        if c.id.revision() != commit {
            write_ref(&self.repo, c.id.revision(), &commit).map_err(|e| io(&self.repo, e))?;
        }
        Ok(pointer)
    }

    /// Fills `blob` with `file`, announced as `size` bytes with hashes `announced`: into
    /// `<blob>.incomplete` (resuming what is there), checked, fsynced, renamed.
    fn download(&self, file: &str, blob: &Path, size: u64, announced: &Announced) -> Result<()> {
        let c = self.client;
        let part = incomplete_path(blob);
        let io = |e: std::io::Error| Error::io(&part, e);
        let mut restarted = false;
        loop {
            let mut have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            if have > size {
                tracing::warn!(
                    "{}: discarding {} ({have} bytes, more than the announced {size})",
                    c.id,
                    part.display()
                );
                std::fs::remove_file(&part).map_err(io)?;
                have = 0;
            }
            let resumed = have > 0;
            if resumed {
                tracing::info!("{}: resuming {file} at byte {have} of {size}", c.id);
            }
            let mut attempt = 0;
            let mut last_err = String::new();
            while have < size && attempt < ATTEMPTS {
                attempt += 1;
                match self.stream(file, &part, have, size) {
                    Ok(()) => {}
                    Err(Stream::Fatal(e)) => {
                        let _ = std::fs::remove_file(&part);
                        return Err(e);
                    }
                    Err(Stream::Interrupted(msg)) => {
                        last_err = msg;
                        if attempt < ATTEMPTS {
                            std::thread::sleep(Duration::from_millis(200 * attempt as u64));
                        }
                    }
                }
                have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            }
            if have < size {
                return Err(c.err(format!(
                    "{file}: download interrupted after {have} of {size} bytes ({last_err}); \
                     the partial file {} is kept and the next run resumes it",
                    part.display()
                )));
            }
            if have > size {
                let _ = std::fs::remove_file(&part);
                return Err(c.err(format!(
                    "{file}: the server sent {have} bytes, more than the announced {size}; \
                     the file was discarded"
                )));
            }
            match verify(&part, announced).map_err(io)? {
                None => break,
                Some(mismatch) => {
                    std::fs::remove_file(&part).map_err(io)?;
                    if resumed && !restarted {
                        // The bytes kept from an earlier run may not be this file's: start over.
                        tracing::warn!("{}: {file}: {mismatch} after resuming; fetching it again from the start", c.id);
                        restarted = true;
                        continue;
                    }
                    return Err(c.err(format!(
                        "{file}: {mismatch}; the download was discarded, run again to re-fetch it"
                    )));
                }
            }
        }
        File::open(&part).and_then(|f| f.sync_all()).map_err(io)?;
        std::fs::rename(&part, blob).map_err(|e| Error::io(blob, e))?;
        sync_dir(blob.parent().expect("blob has a parent"));
        Ok(())
    }

    /// One GET of `file` from byte `from` appended to `part`.
    fn stream(
        &self,
        file: &str,
        part: &Path,
        from: u64,
        size: u64,
    ) -> std::result::Result<(), Stream> {
        let c = self.client;
        let mut req = c.request(&c.agent, &c.file_url(file));
        if from > 0 {
            req = req.set("Range", &format!("bytes={from}-"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, _)) if code >= 500 || code == 429 => {
                return Err(Stream::Interrupted(format!("status code {code}")))
            }
            Err(e @ ureq::Error::Status(..)) => {
                return Err(Stream::Fatal(c.http_err(file, e)));
            }
            Err(ureq::Error::Transport(t)) => return Err(Stream::Interrupted(t.to_string())),
        };
        let mut start = from;
        if resp.status() == 206 {
            let first = resp
                .header("content-range")
                .and_then(|r| r.strip_prefix("bytes "))
                .and_then(|r| r.split('-').next())
                .and_then(|s| s.trim().parse::<u64>().ok());
            if first != Some(from) {
                return Err(Stream::Fatal(c.err(format!(
                    "{file}: asked for bytes from {from}, the server sent Content-Range {:?}",
                    resp.header("content-range")
                ))));
            }
        } else {
            // 200: the whole file, whatever we asked for.
            start = 0;
        }
        let fatal_io = |e: std::io::Error| Stream::Fatal(Error::io(part, e));
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(start > 0)
            .write(true)
            .truncate(start == 0)
            .open(part)
            .map_err(fatal_io)?;
        let bar = c.progress.then(|| {
            let bar = indicatif::ProgressBar::new(size).with_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} {bar:30} {bytes}/{total_bytes} [{elapsed}<{eta}]",
                )
                .expect("static template"),
            );
            bar.set_message(file.to_owned());
            bar.set_position(start);
            bar
        });
        // One byte more than is left, to notice a server that sends too much.
        let mut reader = resp.into_reader().take(size - start + 1);
        let mut buf = vec![0u8; 1 << 16];
        let result = loop {
            match reader.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    out.write_all(&buf[..n]).map_err(fatal_io)?;
                    if let Some(b) = &bar {
                        b.inc(n as u64);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(Stream::Interrupted(e.to_string())),
            }
        };
        out.flush().map_err(fatal_io)?;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let got = out.metadata().map_err(fatal_io)?.len();
        match result {
            Ok(()) if got < size => Err(Stream::Interrupted(format!(
                "the connection closed after {got} of {size} bytes"
            ))),
            other => other,
        }
    }
}

/// How one GET ended when it did not deliver the rest of the file.
enum Stream {
    /// Worth resuming: a dropped connection, a 5xx.
    Interrupted(String),
    /// Not worth retrying (404, a broken Content-Range, a local I/O error).
    Fatal(Error),
}
