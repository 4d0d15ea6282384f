//! Model and dataset resolution: a command-line spec → a local path.
//!
//! A spec is either a local path or a Hugging Face Hub id (`org/name`, optionally
//! `org/name@revision`). Resolution order:
//!
//! 1. An existing local path wins (a model must be a directory).
//! 2. Something that looks like a path (starts with `.`, `/` or `~`, or has more than one `/`)
//!    but does not exist is an error naming it; it is never sent to the Hub.
//! 3. Otherwise it is a Hub id. The local HF cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//!    `~/.cache/huggingface/hub`, the layout `huggingface_hub` and `hf-hub` write) is searched
//!    by [`cached_snapshot`], a pure function of (cache dir, kind, id, revision).
//! 4. If the cache has no usable snapshot: with `HF_HUB_OFFLINE` set, a clear error; otherwise
//!    the needed files are downloaded (see below) into that same cache.
//!
//! Process-global environment variables are read only by [`HubEnv::from_env`]; everything else
//! takes a [`HubEnv`], so tests can point at a temporary cache without touching the process env.
//!
//! Downloads (`hub/download/`: blocking, resumable, size- and hash-checked, atomic, with
//! progress bars) fetch only what qlora needs: for a model `config.json`, the tokenizer files and
//! chat template when the repo has them, and `model.safetensors` or the index and every shard it
//! lists; for a dataset the data files [`data::select_data_files`] picks from the repo listing
//! (train split preferred).

use crate::data;
use crate::error::{Error, Result};
use std::fmt;
use std::path::{Path, PathBuf};

/// Short dataset names accepted without an org.
pub const DATASET_ALIASES: &[(&str, &str)] = &[("guanaco-llama2-1k", "mlabonne/guanaco-llama2-1k")];

/// Optional files fetched with a model when the repo has them.
const MODEL_EXTRA_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// Whether a repo holds a model or a dataset (they live in different cache folders).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    fn prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        }
    }
}

/// Everything resolution reads from the environment.
#[derive(Clone, Default)]
pub struct HubEnv {
    /// The hub cache folder (the one holding `models--org--name`).
    pub cache_dir: PathBuf,
    /// `HF_HUB_OFFLINE`: never download.
    pub offline: bool,
    /// `HF_TOKEN`; when `None`, `token_file` is read at download time.
    pub token: Option<String>,
    /// Where `huggingface-cli login` stores the token (`$HF_HOME/token`, or `HF_TOKEN_PATH`).
    pub token_file: Option<PathBuf>,
    /// `HF_ENDPOINT`, e.g. a mirror; `None` for huggingface.co.
    pub endpoint: Option<String>,
    /// Show download progress bars (off with `HF_HUB_DISABLE_PROGRESS_BARS`).
    pub progress: bool,
    /// The home directory, for `~` in local paths.
    pub home: Option<PathBuf>,
}

impl fmt::Debug for HubEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubEnv")
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("endpoint", &self.endpoint)
            .field("progress", &self.progress)
            .field("home", &self.home)
            .finish()
    }
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

impl HubEnv {
    /// Reads the process environment.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Builds the environment from a variable lookup (empty values count as unset).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let var = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let home = var("HOME")
            .or_else(|| var("USERPROFILE"))
            .map(PathBuf::from);
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        HubEnv {
            cache_dir,
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| truthy(&v)),
            token: var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")),
            token_file: Some(
                var("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_home.join("token")),
            ),
            endpoint: var("HF_ENDPOINT"),
            progress: !var("HF_HUB_DISABLE_PROGRESS_BARS").is_some_and(|v| truthy(&v)),
            home,
        }
    }

    fn token_for_download(&self) -> Option<String> {
        self.token.clone().or_else(|| {
            let text = std::fs::read_to_string(self.token_file.as_ref()?).ok()?;
            Some(text.trim().to_owned()).filter(|t| !t.is_empty())
        })
    }
}

/// A parsed Hub id: `org/name` (or a legacy bare `name`) and an optional revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub id: String,
    pub revision: Option<String>,
}

impl HubId {
    /// Parses `org/name[@revision]`; `None` when it is not a syntactically valid id.
    pub fn parse(spec: &str) -> Option<HubId> {
        let (id, revision) = match spec.split_once('@') {
            Some((id, rev)) if !rev.is_empty() && !rev.contains("..") => (id, Some(rev)),
            Some(_) => return None,
            None => (spec, None),
        };
        let parts: Vec<&str> = id.split('/').collect();
        let ok_part = |p: &&str| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if parts.len() > 2 || !parts.iter().all(ok_part) {
            return None;
        }
        Some(HubId {
            id: id.to_owned(),
            revision: revision.map(str::to_owned),
        })
    }

    /// The revision to use: the given one or `main`.
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

impl fmt::Display for HubId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.revision {
            Some(rev) => write!(f, "{}@{rev}", self.id),
            None => f.write_str(&self.id),
        }
    }
}

/// The cache folder of a repo: `<cache_dir>/models--org--name` (or `datasets--...`).
pub fn repo_cache_dir(cache_dir: &Path, kind: RepoKind, id: &str) -> PathBuf {
    cache_dir.join(format!("{}--{}", kind.prefix(), id.replace('/', "--")))
}

/// Finds a usable snapshot of `id` at `revision` (default `main`) in the hub cache. The snapshot
/// is the one `refs/<revision>` names; a revision that is a commit hash names the snapshot
/// folder directly; with no revision (or `main`) and no `refs/main`, a lone snapshot is used.
/// Usable means [`check_model_dir`] / [`check_dataset_dir`] pass (symlinks into `blobs/` are
/// followed; a dangling one counts as missing). `Err` says why nothing usable was found.
pub fn cached_snapshot(
    cache_dir: &Path,
    kind: RepoKind,
    id: &str,
    revision: Option<&str>,
) -> std::result::Result<PathBuf, String> {
    let repo = repo_cache_dir(cache_dir, kind, id);
    if !repo.is_dir() {
        let name = repo.file_name().unwrap_or_default().to_string_lossy();
        return Err(format!("no {name} folder in it"));
    }
    let rev = revision.unwrap_or("main");
    let default_rev = rev == "main";
    let snapshots = repo.join("snapshots");
    let ref_file = repo.join("refs").join(rev);
    let snapshot = if ref_file.is_file() {
        let hash = std::fs::read_to_string(&ref_file)
            .map_err(|e| format!("cannot read {}: {e}", ref_file.display()))?;
        let hash = hash.trim();
        let dir = snapshots.join(hash);
        if hash.is_empty() || !dir.is_dir() {
            return Err(format!(
                "refs/{rev} names snapshot `{hash}`, which is not in {}",
                snapshots.display()
            ));
        }
        dir
    } else if revision.is_some() && snapshots.join(rev).is_dir() && !rev.contains('/') {
        snapshots.join(rev)
    } else if default_rev {
        let mut all: Vec<PathBuf> = match std::fs::read_dir(&snapshots) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect(),
            Err(_) => vec![],
        };
        match all.len() {
            1 => all.pop().expect("one snapshot"),
            0 => return Err(format!("no snapshots in {}", repo.display())),
            n => {
                return Err(format!(
                    "no refs/main and {n} snapshots in {}; name one with {id}@<commit>",
                    repo.display()
                ))
            }
        }
    } else {
        return Err(format!(
            "no refs/{rev} and no snapshot named `{rev}` in {}",
            repo.display()
        ));
    };
    match kind {
        RepoKind::Model => check_model_dir(&snapshot)?,
        RepoKind::Dataset => check_dataset_dir(&snapshot)?,
    }
    Ok(snapshot)
}

/// The shard file names listed in a `model.safetensors.index.json` (sorted, deduplicated).
pub fn index_shards(index: &Path) -> std::result::Result<Vec<String>, String> {
    let text = std::fs::read_to_string(index).map_err(|e| format!("{}: {e}", index.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: malformed JSON: {e}", index.display()))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| format!("{}: no `weight_map` object", index.display()))?;
    let mut shards: Vec<String> = map
        .values()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("{}: weight_map value {v} is not a string", index.display()))
        })
        .collect::<std::result::Result<_, _>>()?;
    shards.sort();
    shards.dedup();
    if shards.is_empty() {
        return Err(format!("{}: empty weight_map", index.display()));
    }
    Ok(shards)
}

/// Whether `dir` holds a loadable model: `config.json` and either `model.safetensors` or
/// `model.safetensors.index.json` with every listed shard present. `Err` says what is missing.
pub fn check_model_dir(dir: &Path) -> std::result::Result<(), String> {
    let at = dir.display();
    if !dir.join("config.json").is_file() {
        return Err(format!("{at} has no config.json"));
    }
    if dir.join("model.safetensors").is_file() {
        return Ok(());
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(format!(
            "{at} has neither model.safetensors nor model.safetensors.index.json"
        ));
    }
    let missing: Vec<String> = index_shards(&index)?
        .into_iter()
        .filter(|s| !dir.join(s).is_file())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("{at} is missing shard(s) {}", missing.join(", ")))
    }
}

/// Whether `dir` holds at least one data file that [`data::load_rows`] would read, all present.
pub fn check_dataset_dir(dir: &Path) -> std::result::Result<(), String> {
    let files = data::data_files(dir).map_err(|e| e.to_string())?;
    if files.is_empty() {
        return Err(format!(
            "{} has no data files ({})",
            dir.display(),
            data::SUPPORTED_FORMATS
        ));
    }
    match files.iter().find(|f| !f.is_file()) {
        Some(f) => Err(format!("{} is missing (dangling link?)", f.display())),
        None => Ok(()),
    }
}

/// Whether a spec that is not an existing path should be treated as a path anyway.
fn looks_like_path(spec: &str) -> bool {
    let before_rev = spec.split('@').next().unwrap_or(spec);
    spec.starts_with('.')
        || spec.starts_with('/')
        || spec.starts_with('~')
        || spec.contains('\\')
        || before_rev.matches('/').count() > 1
}

fn expand_tilde(spec: &str, home: Option<&Path>) -> PathBuf {
    match (spec.strip_prefix('~'), home) {
        (Some(""), Some(h)) => h.to_path_buf(),
        (Some(rest), Some(h)) if rest.starts_with('/') => h.join(&rest[1..]),
        _ => PathBuf::from(spec),
    }
}

/// A model given as a local directory, or a HF id `org/name` (optionally `org/name@revision`).
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    resolve_model_in(spec, &HubEnv::from_env())
}

/// A dataset given as a local file or folder, or a HF dataset id; bare `guanaco-llama2-1k`
/// means `mlabonne/guanaco-llama2-1k`.
pub fn resolve_dataset(spec: &str) -> Result<PathBuf> {
    resolve_dataset_in(spec, &HubEnv::from_env())
}

/// [`resolve_model`] against an explicit environment.
pub fn resolve_model_in(spec: &str, env: &HubEnv) -> Result<PathBuf> {
    let local = expand_tilde(spec, env.home.as_deref());
    if local.exists() {
        if local.is_dir() {
            return Ok(local);
        }
        return Err(Error::bad_file(
            local,
            "expected a model directory (with config.json and *.safetensors), but this is a file",
        ));
    }
    if looks_like_path(spec) {
        return Err(Error::NotFound(format!(
            "model directory {} does not exist",
            local.display()
        )));
    }
    let id = parse_id(spec, RepoKind::Model)?;
    resolve_id(&id, RepoKind::Model, env)
}

/// [`resolve_dataset`] against an explicit environment.
pub fn resolve_dataset_in(spec: &str, env: &HubEnv) -> Result<PathBuf> {
    let local = expand_tilde(spec, env.home.as_deref());
    if local.exists() {
        return Ok(local);
    }
    if looks_like_path(spec) {
        return Err(Error::NotFound(format!(
            "dataset path {} does not exist",
            local.display()
        )));
    }
    let mut id = parse_id(spec, RepoKind::Dataset)?;
    if let Some((_, full)) = DATASET_ALIASES.iter().find(|(short, _)| *short == id.id) {
        id.id = (*full).to_owned();
    }
    resolve_id(&id, RepoKind::Dataset, env)
}

fn parse_id(spec: &str, kind: RepoKind) -> Result<HubId> {
    HubId::parse(spec).ok_or_else(|| {
        Error::NotFound(format!(
            "{} `{spec}` is neither an existing local path nor a Hugging Face id (org/name or org/name@revision)",
            kind.noun()
        ))
    })
}

fn resolve_id(id: &HubId, kind: RepoKind, env: &HubEnv) -> Result<PathBuf> {
    let why = match cached_snapshot(&env.cache_dir, kind, &id.id, id.revision.as_deref()) {
        Ok(dir) => {
            tracing::debug!(
                "{} {id}: using cached snapshot {}",
                kind.noun(),
                dir.display()
            );
            return Ok(dir);
        }
        Err(why) => why,
    };
    if env.offline {
        let local = match kind {
            RepoKind::Model => "a local directory",
            RepoKind::Dataset => "a local file or folder",
        };
        return Err(Error::NotFound(format!(
            "{} {id} is not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set; \
             download it first or pass {local} ({why})",
            kind.noun(),
            env.cache_dir.display()
        )));
    }
    tracing::info!(
        "{} {id} not usable from the cache ({why}); downloading",
        kind.noun()
    );
    let dir = download::fetch(id, kind, env).map_err(|e| match e {
        Error::Hub(msg) => Error::Hub(format!(
            "{msg} (and the cache at {} has no usable copy: {why})",
            env.cache_dir.display()
        )),
        other => other,
    })?;
    tracing::info!("{} {id}: downloaded to {}", kind.noun(), dir.display());
    Ok(dir)
}

/// The network side: only reached when the cache has nothing usable and downloads are allowed.
mod download;

/// Tries per file within one run: the first request plus resumes after a dropped connection.
pub const DOWNLOAD_ATTEMPTS: usize = download::ATTEMPTS;
