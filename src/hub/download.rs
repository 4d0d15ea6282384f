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

use super::{check_dataset_dir, check_model_dir, index_shards, HubEnv, HubId, RepoKind};
use super::{repo_cache_dir, MODEL_EXTRA_FILES};
use crate::data;
use crate::error::{Error, Result};
use sha1::Digest as _;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// Attempts per file within one run (the first try plus resumes after a dropped connection).
pub const ATTEMPTS: usize = 3;
/// Largest repo listing accepted.
const MAX_LISTING_BYTES: u64 = 64 << 20;
/// How long to wait for another process that holds a blob's lock.
const LOCK_WAIT: Duration = Duration::from_secs(60);

/// What the Hub announces about one file of a revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Announced {
    size: Option<u64>,
    /// SHA-256 of the content (LFS files), lowercase hex.
    sha256: Option<String>,
    /// Git blob id: SHA-1 of `blob <len>\0<content>` (files stored in git), lowercase hex.
    git_sha1: Option<String>,
}

impl Announced {
    /// The blob's name in `blobs/`: the LFS SHA-256, else the git blob id (what the Hub sends as
    /// the file's ETag, and so what `huggingface_hub` names the blob).
    fn etag(&self) -> Option<&str> {
        self.sha256.as_deref().or(self.git_sha1.as_deref())
    }
}

/// A revision's listing: the commit and every file with what is announced about it.
struct Listing {
    commit: String,
    files: Vec<String>,
    announced: HashMap<String, Announced>,
}

/// An HTTP client for one repo revision.
struct Client {
    agent: ureq::Agent,
    /// Does not follow redirects: the Hub puts a file's metadata on the redirect itself.
    meta_agent: ureq::Agent,
    token: Option<String>,
    endpoint: String,
    id: HubId,
    kind: RepoKind,
    progress: bool,
}

/// Percent-encodes everything but unreserved characters and `/`.
fn encode_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    fn new(id: &HubId, kind: RepoKind, env: &HubEnv) -> Client {
        let builder = || {
            ureq::AgentBuilder::new()
                .try_proxy_from_env(true)
                .redirect_auth_headers(ureq::RedirectAuthHeaders::SameHost)
                .user_agent(concat!("qlora/", env!("CARGO_PKG_VERSION")))
                .timeout_connect(Duration::from_secs(30))
                .timeout_read(Duration::from_secs(60))
        };
        Client {
            agent: builder().build(),
            meta_agent: builder().redirects(0).build(),
            token: env.token_for_download(),
            endpoint: env
                .endpoint
                .as_deref()
                .unwrap_or("https://huggingface.co")
                .trim_end_matches('/')
                .to_owned(),
            id: id.clone(),
            kind,
            progress: env.progress,
        }
    }

    fn request(&self, agent: &ureq::Agent, url: &str) -> ureq::Request {
        let r = agent.get(url);
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::Hub(format!("{}: {msg}", self.id))
    }

    /// An HTTP failure, with a hint for the usual status codes.
    fn http_err(&self, what: &str, e: ureq::Error) -> Error {
        let hint = match &e {
            ureq::Error::Status(401 | 403, _) => {
                " (private or gated repo? accept its license on the Hub and set HF_TOKEN)"
            }
            ureq::Error::Status(404, _) if self.id.id.contains('/') => {
                " (no such repo or revision)"
            }
            ureq::Error::Status(404, _) => {
                " (no such repo or revision, and no local path of that name)"
            }
            _ => "",
        };
        let msg = match e {
            ureq::Error::Status(code, _) => {
                format!("{what}: the server answered status code {code}")
            }
            ureq::Error::Transport(t) => format!("{what}: {t}"),
        };
        self.err(format!("{msg}{hint}"))
    }

    fn repo_path(&self) -> String {
        match self.kind {
            RepoKind::Model => self.id.id.clone(),
            RepoKind::Dataset => format!("datasets/{}", self.id.id),
        }
    }

    fn file_url(&self, file: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint,
            self.repo_path(),
            encode_path(self.id.revision()).replace('/', "%2F"),
            encode_path(file)
        )
    }

    /// `GET /api/{models|datasets}/{id}/revision/{rev}?blobs=true`.
    fn listing(&self) -> Result<Listing> {
        let url = format!(
            "{}/api/{}/{}/revision/{}?blobs=true",
            self.endpoint,
            self.kind.prefix(),
            self.id.id,
            encode_path(self.id.revision()).replace('/', "%2F")
        );
        let resp = self
            .request(&self.agent, &url)
            .call()
            .map_err(|e| self.http_err("listing the repo", e))?;
        let mut body = Vec::new();
        resp.into_reader()
            .take(MAX_LISTING_BYTES + 1)
            .read_to_end(&mut body)
            .map_err(|e| self.err(format!("reading the repo listing: {e}")))?;
        if body.len() as u64 > MAX_LISTING_BYTES {
            return Err(self.err(format!(
                "the repo listing is larger than {} MiB; refusing it",
                MAX_LISTING_BYTES >> 20
            )));
        }
        parse_listing(&body).map_err(|msg| self.err(format!("repo listing: {msg}")))
    }

    /// What the `resolve` response headers say about `file` (for listings without sizes).
    fn head(&self, file: &str) -> Result<Head> {
        let resp = self
            .request(&self.meta_agent, &self.file_url(file))
            .set("Range", "bytes=0-0")
            .call()
            .map_err(|e| self.http_err(file, e))?;
        let header = |k: &str| resp.header(k).map(str::to_owned);
        let etag = header("x-linked-etag")
            .or_else(|| header("etag"))
            .map(|e| e.trim_start_matches("W/").replace('"', ""));
        let size = header("x-linked-size")
            .and_then(|s| s.trim().parse().ok())
            .or_else(|| {
                header("content-range")
                    .and_then(|r| r.rsplit('/').next().and_then(|t| t.trim().parse().ok()))
            })
            .or_else(|| {
                (resp.status() == 200)
                    .then(|| header("content-length").and_then(|s| s.trim().parse().ok()))
                    .flatten()
            });
        let mut announced = Announced {
            size,
            ..Announced::default()
        };
        // A SHA-256 ETag is an LFS file's hash, a SHA-1 one a git blob id; anything else is only
        // a name.
        match &etag {
            Some(e) if is_hex(e, 64) => announced.sha256 = Some(e.to_ascii_lowercase()),
            Some(e) if is_hex(e, 40) => announced.git_sha1 = Some(e.to_ascii_lowercase()),
            _ => {}
        }
        Ok(Head {
            announced,
            etag,
            commit: header("x-repo-commit"),
        })
    }
}

/// The `resolve` response headers of one file.
struct Head {
    announced: Announced,
    etag: Option<String>,
    commit: Option<String>,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A plain file-name token (commit hashes, blob names): no separators, no dot-dot.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !s.starts_with('.')
}

/// Whether a listed file name is a plain relative path inside the repo.
fn is_plain_relative(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('\\')
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Parses the `?blobs=true` listing (`sha`, `siblings[].{rfilename, size, blobId, lfs}`).
fn parse_listing(body: &[u8]) -> std::result::Result<Listing, String> {
    #[derive(serde::Deserialize)]
    struct Lfs {
        sha256: Option<String>,
        size: Option<u64>,
    }
    #[derive(serde::Deserialize)]
    struct Sibling {
        rfilename: String,
        size: Option<u64>,
        #[serde(rename = "blobId")]
        blob_id: Option<String>,
        lfs: Option<Lfs>,
    }
    #[derive(serde::Deserialize)]
    struct Info {
        sha: Option<String>,
        siblings: Option<Vec<Sibling>>,
    }
    let info: Info = serde_json::from_slice(body).map_err(|e| format!("malformed JSON: {e}"))?;
    let commit = info.sha.unwrap_or_default();
    if !commit.is_empty() && !is_token(&commit) {
        return Err(format!("commit {commit:?} is not a plain token"));
    }
    let mut files = Vec::new();
    let mut announced = HashMap::new();
    for s in info.siblings.unwrap_or_default() {
        if !is_plain_relative(&s.rfilename) {
            return Err(format!(
                "file name {:?} is not a relative path inside the repo",
                s.rfilename
            ));
        }
        let mut a = Announced {
            size: s.size,
            ..Announced::default()
        };
        if let Some(lfs) = s.lfs {
            if let Some(h) = lfs.sha256.filter(|h| is_hex(h, 64)) {
                a.sha256 = Some(h.to_ascii_lowercase());
            }
            a.size = lfs.size.or(a.size);
        } else if let Some(b) = s.blob_id.filter(|b| is_hex(b, 40)) {
            a.git_sha1 = Some(b.to_ascii_lowercase());
        }
        files.push(s.rfilename.clone());
        announced.insert(s.rfilename, a);
    }
    Ok(Listing {
        commit,
        files,
        announced,
    })
}

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

/// `<blob>.incomplete`.
fn incomplete_path(blob: &Path) -> PathBuf {
    let mut name = blob.file_name().expect("blob has a name").to_os_string();
    name.push(".incomplete");
    blob.with_file_name(name)
}

/// Checks `path` against the announced hashes; `Some(message)` on a mismatch.
fn verify(path: &Path, announced: &Announced) -> std::io::Result<Option<String>> {
    if announced.sha256.is_none() && announced.git_sha1.is_none() {
        return Ok(None);
    }
    let len = std::fs::metadata(path)?.len();
    let mut sha256 = sha2::Sha256::new();
    let mut sha1 = sha1::Sha1::new();
    sha1.update(format!("blob {len}\0").as_bytes());
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if announced.sha256.is_some() {
            sha256.update(&buf[..n]);
        } else {
            sha1.update(&buf[..n]);
        }
    }
    let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    if let Some(want) = &announced.sha256 {
        let got = hex(&sha256.finalize());
        if &got != want {
            return Ok(Some(format!(
                "SHA-256 mismatch: the Hub announced {want}, the downloaded bytes hash to {got}"
            )));
        }
    } else if let Some(want) = &announced.git_sha1 {
        let got = hex(&sha1.finalize());
        if &got != want {
            return Ok(Some(format!(
                "git blob id mismatch: the Hub announced {want}, the downloaded bytes give {got}"
            )));
        }
    }
    Ok(None)
}

/// Points `pointer` (a snapshot file) at `blob` with a relative symlink, atomically replacing
/// whatever was there (a temporary link renamed into place). Copies where symlinks are not
/// available.
fn link(blob: &Path, pointer: &Path, rel: &str) -> std::io::Result<()> {
    let parent = pointer.parent().expect("pointer has a parent");
    std::fs::create_dir_all(parent)?;
    let name = pointer
        .file_name()
        .expect("pointer has a name")
        .to_string_lossy();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    #[cfg(unix)]
    {
        let ups = "../".repeat(rel.split('/').count() + 1);
        let blob_name = blob.file_name().expect("blob has a name").to_string_lossy();
        std::os::unix::fs::symlink(format!("{ups}blobs/{blob_name}"), &tmp)?;
    }
    #[cfg(not(unix))]
    {
        let _ = rel;
        std::fs::copy(blob, &tmp)?;
    }
    std::fs::rename(&tmp, pointer)?;
    sync_dir(parent);
    Ok(())
}

/// Writes `refs/<revision>` = `commit` (temporary file renamed into place).
fn write_ref(repo: &Path, revision: &str, commit: &str) -> std::io::Result<()> {
    let path = repo.join("refs").join(revision);
    if std::fs::read_to_string(&path).is_ok_and(|c| c.trim() == commit) {
        return Ok(());
    }
    let parent = path.parent().expect("ref has a parent");
    std::fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(".ref.tmp-{}", std::process::id()));
    std::fs::write(&tmp, commit)?;
    std::fs::rename(&tmp, &path)
}

/// fsyncs a directory so a rename in it survives a crash (best effort; a no-op off Unix).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// The snapshot folder holding `path`, which is `rel` inside it.
fn snapshot_root(path: &Path, rel: &str) -> PathBuf {
    let mut root = path.to_path_buf();
    for _ in rel.split('/') {
        root.pop();
    }
    root
}

/// An exclusive `flock` on `<blob>.lock`, released on drop (and by the kernel if we die).
struct BlobLock {
    #[cfg_attr(not(unix), allow(dead_code))]
    file: File,
}

impl BlobLock {
    fn acquire(blob: &Path) -> std::result::Result<BlobLock, String> {
        let mut name = blob.file_name().expect("blob has a name").to_os_string();
        name.push(".lock");
        let path = blob.with_file_name(name);
        let file = File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            let start = std::time::Instant::now();
            let mut told = false;
            loop {
                // SAFETY: flock on a descriptor we own; no memory is involved.
                let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
                if r == 0 {
                    break;
                }
                if start.elapsed() > LOCK_WAIT {
                    return Err(format!(
                        "another process has been downloading {} for over {} s (lock {} held); try again later",
                        blob.display(),
                        LOCK_WAIT.as_secs(),
                        path.display()
                    ));
                }
                if !told {
                    tracing::info!("waiting for another process downloading {}", blob.display());
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        Ok(BlobLock { file })
    }
}

impl Drop for BlobLock {
    fn drop(&mut self) {
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: as in `acquire`.
            unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_with_blobs() {
        let l = parse_listing(
            br#"{"sha":"abc123","siblings":[
              {"rfilename":"config.json","size":10,"blobId":"0123456789012345678901234567890123456789"},
              {"rfilename":"model.safetensors","size":5,"blobId":"ffffffffffffffffffffffffffffffffffffffff",
               "lfs":{"sha256":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","size":99,"pointerSize":1}}]}"#,
        )
        .unwrap();
        assert_eq!(l.commit, "abc123");
        let cfg = &l.announced["config.json"];
        assert_eq!(cfg.size, Some(10));
        assert_eq!(cfg.etag(), Some("0123456789012345678901234567890123456789"));
        let m = &l.announced["model.safetensors"];
        assert_eq!(m.size, Some(99));
        assert_eq!(m.etag(), Some(&"a".repeat(64)[..]));
    }

    #[test]
    fn listing_refuses_paths_outside_the_repo() {
        for bad in ["../x", "/etc/passwd", "a/../../b", "", "a\\b"] {
            let body = format!(r#"{{"sha":"c","siblings":[{{"rfilename":{bad:?}}}]}}"#);
            assert!(parse_listing(body.as_bytes()).is_err(), "{bad}");
        }
        assert!(parse_listing(br#"{"sha":"../c","siblings":[]}"#).is_err());
    }

    #[test]
    fn git_blob_id_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"hello\n").unwrap();
        // `git hash-object` of "hello\n".
        let good = Announced {
            size: Some(6),
            sha256: None,
            git_sha1: Some("ce013625030ba8dba906f756967f9e9ca394464a".into()),
        };
        assert_eq!(verify(&p, &good).unwrap(), None);
        let bad = Announced {
            git_sha1: Some("0".repeat(40)),
            ..good
        };
        assert!(verify(&p, &bad).unwrap().unwrap().contains("mismatch"));
    }
}
