//! The HTTP side of a download: the repo listing (`?blobs=true`) and what it announces, the
//! `resolve` response headers, and the checks that keep a hostile listing inside the cache.

use super::super::{HubEnv, HubId, RepoKind};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path};
use std::time::Duration;

/// Largest repo listing accepted.
const MAX_LISTING_BYTES: u64 = 64 << 20;

/// What the Hub announces about one file of a revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Announced {
    pub(super) size: Option<u64>,
    /// SHA-256 of the content (LFS files), lowercase hex.
    pub(super) sha256: Option<String>,
    /// Git blob id: SHA-1 of `blob <len>\0<content>` (files stored in git), lowercase hex.
    pub(super) git_sha1: Option<String>,
}

impl Announced {
    /// The blob's name in `blobs/`: the LFS SHA-256, else the git blob id (what the Hub sends as
    /// the file's ETag, and so what `huggingface_hub` names the blob).
    pub(super) fn etag(&self) -> Option<&str> {
        self.sha256.as_deref().or(self.git_sha1.as_deref())
    }
}

/// A revision's listing: the commit and every file with what is announced about it.
pub(super) struct Listing {
    pub(super) commit: String,
    pub(super) files: Vec<String>,
    pub(super) announced: HashMap<String, Announced>,
}

/// An HTTP client for one repo revision.
pub(super) struct Client {
    pub(super) agent: ureq::Agent,
    /// Does not follow redirects: the Hub puts a file's metadata on the redirect itself.
    pub(super) meta_agent: ureq::Agent,
    pub(super) token: Option<String>,
    pub(super) endpoint: String,
    pub(super) id: HubId,
    pub(super) kind: RepoKind,
    pub(super) progress: bool,
}

/// Percent-encodes everything but unreserved characters and `/`.
pub(super) fn encode_path(s: &str) -> String {
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
    pub(super) fn new(id: &HubId, kind: RepoKind, env: &HubEnv) -> Client {
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

    pub(super) fn request(&self, agent: &ureq::Agent, url: &str) -> ureq::Request {
        let r = agent.get(url);
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }

    pub(super) fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::Hub(format!("{}: {msg}", self.id))
    }

    /// An HTTP failure, with a hint for the usual status codes.
    pub(super) fn http_err(&self, what: &str, e: ureq::Error) -> Error {
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

    pub(super) fn repo_path(&self) -> String {
        match self.kind {
            RepoKind::Model => self.id.id.clone(),
            RepoKind::Dataset => format!("datasets/{}", self.id.id),
        }
    }

    pub(super) fn file_url(&self, file: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint,
            self.repo_path(),
            encode_path(self.id.revision()).replace('/', "%2F"),
            encode_path(file)
        )
    }

    /// `GET /api/{models|datasets}/{id}/revision/{rev}?blobs=true`.
    pub(super) fn listing(&self) -> Result<Listing> {
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
    pub(super) fn head(&self, file: &str) -> Result<Head> {
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
pub(super) struct Head {
    pub(super) announced: Announced,
    pub(super) etag: Option<String>,
    pub(super) commit: Option<String>,
}

pub(super) fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A plain file-name token (commit hashes, blob names): no separators, no dot-dot.
pub(super) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !s.starts_with('.')
}

/// Whether a listed file name is a plain relative path inside the repo.
pub(super) fn is_plain_relative(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('\\')
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Parses the `?blobs=true` listing (`sha`, `siblings[].{rfilename, size, blobId, lfs}`).
pub(super) fn parse_listing(body: &[u8]) -> std::result::Result<Listing, String> {
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
}
