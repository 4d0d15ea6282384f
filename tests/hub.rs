//! Model / dataset resolution against a fake Hugging Face cache built in a tempdir with the
//! real layout (`blobs/` + relative symlinks in `snapshots/<commit>/`, `refs/<name>`).
//! Every environment is `offline`, so no test can reach the network.

use qlora::hub::{
    cached_snapshot, check_model_dir, index_shards, resolve_dataset_in, resolve_model_in, HubEnv,
    HubId, RepoKind,
};
use qlora::Error;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const C1: &str = "1111111111111111111111111111111111111111";
const C2: &str = "2222222222222222222222222222222222222222";

fn env(cache: &Path) -> HubEnv {
    HubEnv {
        cache_dir: cache.to_path_buf(),
        offline: true,
        ..HubEnv::default()
    }
}

/// One repo folder (`models--org--name`) in a fake cache.
struct FakeRepo {
    dir: PathBuf,
}

impl FakeRepo {
    fn new(cache: &Path, kind: &str, id: &str) -> Self {
        let dir = cache.join(format!("{kind}--{}", id.replace('/', "--")));
        std::fs::create_dir_all(dir.join("blobs")).unwrap();
        FakeRepo { dir }
    }

    /// Stores `content` as a blob and links `snapshots/<commit>/<rel>` to it, relatively, like
    /// `huggingface_hub` does.
    fn file(&self, commit: &str, rel: &str, content: &[u8]) -> &Self {
        let hash = format!("{:x}", Sha256::digest(content));
        std::fs::write(self.dir.join("blobs").join(&hash), content).unwrap();
        self.link(commit, rel, &hash)
    }

    fn link(&self, commit: &str, rel: &str, blob: &str) -> &Self {
        let link = self.dir.join("snapshots").join(commit).join(rel);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let ups = "../".repeat(rel.split('/').count() + 1);
        std::os::unix::fs::symlink(format!("{ups}blobs/{blob}"), &link).unwrap();
        self
    }

    fn set_ref(&self, name: &str, commit: &str) -> &Self {
        let path = self.dir.join("refs").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, commit).unwrap();
        self
    }

    fn snapshot(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    /// A complete single-file model snapshot.
    fn model(&self, commit: &str, tag: &str) -> &Self {
        self.file(
            commit,
            "config.json",
            format!("{{\"tag\": \"{tag}\"}}").as_bytes(),
        )
        .file(commit, "tokenizer.json", b"{}")
        .file(commit, "model.safetensors", tag.as_bytes())
    }
}

fn index_json(shards: &[&str]) -> String {
    let entries: Vec<String> = shards
        .iter()
        .enumerate()
        .map(|(i, s)| format!("\"layer{i}.weight\": \"{s}\""))
        .collect();
    format!(
        "{{\"metadata\": {{}}, \"weight_map\": {{{}}}}}",
        entries.join(", ")
    )
}

fn not_found_msg(err: Error) -> String {
    match err {
        Error::NotFound(msg) => msg,
        other => panic!("expected Error::NotFound, got {other:?}"),
    }
}

#[test]
fn local_directory_is_used_as_is() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().to_str().unwrap();
    assert_eq!(
        resolve_model_in(spec, &env(dir.path())).unwrap(),
        dir.path()
    );
    // An existing relative path wins even when it looks like an `org/name` id.
    let got = resolve_model_in("tests/fixtures", &env(dir.path())).unwrap();
    assert_eq!(got, PathBuf::from("tests/fixtures"));
}

#[test]
fn tilde_expands_to_home() {
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir(home.path().join("llama")).unwrap();
    let e = HubEnv {
        home: Some(home.path().to_path_buf()),
        ..env(home.path())
    };
    assert_eq!(
        resolve_model_in("~/llama", &e).unwrap(),
        home.path().join("llama")
    );
    let msg = not_found_msg(resolve_model_in("~/nope", &e).unwrap_err());
    assert!(
        msg.contains(&home.path().join("nope").display().to_string()),
        "{msg}"
    );
}

#[test]
fn missing_local_directory_is_not_sent_to_the_hub() {
    let cache = tempfile::tempdir().unwrap();
    for spec in [
        "./no/such/model",
        "/no/such/model",
        "models/llama/7b",
        "../llama",
    ] {
        let msg = not_found_msg(resolve_model_in(spec, &env(cache.path())).unwrap_err());
        assert!(msg.contains("model directory"), "{spec}: {msg}");
        assert!(msg.contains("does not exist"), "{spec}: {msg}");
        assert!(!msg.contains("HF_HUB_OFFLINE"), "{spec}: {msg}");
    }
    let msg = not_found_msg(resolve_dataset_in("./data/x.jsonl", &env(cache.path())).unwrap_err());
    assert!(
        msg.contains("dataset path ./data/x.jsonl does not exist"),
        "{msg}"
    );
}

#[test]
fn a_file_is_not_a_model_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.json");
    std::fs::write(&file, "{}").unwrap();
    let err = resolve_model_in(file.to_str().unwrap(), &env(dir.path())).unwrap_err();
    assert!(matches!(err, Error::BadFile { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&file.display().to_string()) && msg.contains("is a file"),
        "{msg}"
    );
    // A dataset may be a single file.
    assert_eq!(
        resolve_dataset_in(file.to_str().unwrap(), &env(dir.path())).unwrap(),
        file
    );
}

#[test]
fn cached_model_via_refs_main() {
    let cache = tempfile::tempdir().unwrap();
    let repo = FakeRepo::new(cache.path(), "models", "meta-llama/Llama-2-7b-chat-hf");
    repo.model(C1, "old").model(C2, "new").set_ref("main", C2);
    let got = resolve_model_in("meta-llama/Llama-2-7b-chat-hf", &env(cache.path())).unwrap();
    assert_eq!(got, repo.snapshot(C2));
    // The symlinks resolve into blobs/.
    let config = std::fs::read_to_string(got.join("config.json")).unwrap();
    assert_eq!(config, "{\"tag\": \"new\"}");
    assert!(std::fs::symlink_metadata(got.join("config.json"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn specific_revision_by_ref_or_commit() {
    let cache = tempfile::tempdir().unwrap();
    let repo = FakeRepo::new(cache.path(), "models", "org/m");
    repo.model(C1, "v1")
        .model(C2, "main")
        .set_ref("main", C2)
        .set_ref("v1.0", C1);
    let e = env(cache.path());
    assert_eq!(
        resolve_model_in("org/m@v1.0", &e).unwrap(),
        repo.snapshot(C1)
    );
    assert_eq!(
        resolve_model_in(&format!("org/m@{C1}"), &e).unwrap(),
        repo.snapshot(C1)
    );
    assert_eq!(
        resolve_model_in("org/m@main", &e).unwrap(),
        repo.snapshot(C2)
    );
    let msg = not_found_msg(resolve_model_in("org/m@v2.0", &e).unwrap_err());
    assert!(
        msg.starts_with("model org/m@v2.0 is not in the Hugging Face cache"),
        "{msg}"
    );
    assert!(msg.contains("no refs/v2.0"), "{msg}");
}

#[test]
fn lone_snapshot_without_refs_is_used_but_not_when_ambiguous() {
    let cache = tempfile::tempdir().unwrap();
    let repo = FakeRepo::new(cache.path(), "models", "org/m");
    repo.model(C1, "only");
    let e = env(cache.path());
    assert_eq!(resolve_model_in("org/m", &e).unwrap(), repo.snapshot(C1));
    assert_eq!(
        resolve_model_in("org/m@main", &e).unwrap(),
        repo.snapshot(C1)
    );
    assert!(
        resolve_model_in("org/m@v1", &e).is_err(),
        "a named revision needs its ref"
    );
    repo.model(C2, "second");
    let msg = not_found_msg(resolve_model_in("org/m", &e).unwrap_err());
    assert!(msg.contains("no refs/main and 2 snapshots"), "{msg}");
}

#[test]
fn refs_pointing_at_a_missing_snapshot() {
    let cache = tempfile::tempdir().unwrap();
    let repo = FakeRepo::new(cache.path(), "models", "org/m");
    repo.model(C1, "x").set_ref("main", C2);
    let why = cached_snapshot(cache.path(), RepoKind::Model, "org/m", None).unwrap_err();
    assert!(why.contains("refs/main") && why.contains(C2), "{why}");
}

#[test]
fn sharded_model_needs_every_shard() {
    let cache = tempfile::tempdir().unwrap();
    let repo = FakeRepo::new(cache.path(), "models", "org/sharded");
    let shards = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    repo.file(C1, "config.json", b"{}")
        .file(
            C1,
            "model.safetensors.index.json",
            index_json(&[shards[0], shards[1], shards[0]]).as_bytes(),
        )
        .file(C1, shards[0], b"shard one")
        .set_ref("main", C1);
    let e = env(cache.path());

    let msg = not_found_msg(resolve_model_in("org/sharded", &e).unwrap_err());
    assert!(
        msg.starts_with("model org/sharded is not in the Hugging Face cache at"),
        "{msg}"
    );
    assert!(msg.contains("HF_HUB_OFFLINE is set"), "{msg}");
    assert!(
        msg.contains("missing shard(s) model-00002-of-00002.safetensors"),
        "{msg}"
    );

    // A dangling symlink (blob never finished downloading) is still missing.
    repo.link(C1, shards[1], "0123456789abcdef");
    let msg = not_found_msg(resolve_model_in("org/sharded", &e).unwrap_err());
    assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");

    // With the blob in place the snapshot is usable.
    std::fs::write(repo.dir.join("blobs/0123456789abcdef"), b"shard two").unwrap();
    assert_eq!(
        resolve_model_in("org/sharded", &e).unwrap(),
        repo.snapshot(C1)
    );
}

#[test]
fn model_snapshot_without_weights_or_config_is_not_usable() {
    let cache = tempfile::tempdir().unwrap();
    let repo = FakeRepo::new(cache.path(), "models", "org/m");
    repo.file(C1, "config.json", b"{}").set_ref("main", C1);
    let why = cached_snapshot(cache.path(), RepoKind::Model, "org/m", None).unwrap_err();
    assert!(why.contains("neither model.safetensors nor"), "{why}");

    let repo2 = FakeRepo::new(cache.path(), "models", "org/n");
    repo2
        .file(C1, "model.safetensors", b"w")
        .set_ref("main", C1);
    let why = cached_snapshot(cache.path(), RepoKind::Model, "org/n", None).unwrap_err();
    assert!(why.contains("no config.json"), "{why}");
}

#[test]
fn real_llama_index_lists_two_shards() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-2-7b-chat-hf");
    let shards = index_shards(&dir.join("model.safetensors.index.json")).unwrap();
    assert_eq!(
        shards,
        vec![
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    // The fixture ships the index but not the weights.
    let why = check_model_dir(&dir).unwrap_err();
    assert!(
        why.contains("missing shard(s) model-00001-of-00002.safetensors"),
        "{why}"
    );
}

#[test]
fn offline_and_not_cached_error_text() {
    let cache = tempfile::tempdir().unwrap();
    let err = resolve_model_in("meta-llama/Llama-2-7b-chat-hf", &env(cache.path())).unwrap_err();
    let msg = not_found_msg(err);
    let expected = format!(
        "model meta-llama/Llama-2-7b-chat-hf is not in the Hugging Face cache at {} and \
         HF_HUB_OFFLINE is set; download it first or pass a local directory",
        cache.path().display()
    );
    assert!(msg.starts_with(&expected), "{msg}");

    let msg = not_found_msg(resolve_dataset_in("org/data", &env(cache.path())).unwrap_err());
    assert!(
        msg.starts_with("dataset org/data is not in the Hugging Face cache"),
        "{msg}"
    );
    assert!(msg.contains("pass a local file or folder"), "{msg}");
}

#[test]
fn invalid_ids_are_rejected_without_lookup() {
    let cache = tempfile::tempdir().unwrap();
    for spec in ["org/na me", "org/", "org/name@", "a b"] {
        let msg = not_found_msg(resolve_model_in(spec, &env(cache.path())).unwrap_err());
        assert!(
            msg.contains("neither an existing local path nor a Hugging Face id"),
            "{msg}"
        );
    }
}

#[test]
fn hub_id_parsing() {
    let id = HubId::parse("org/name@v1.0").unwrap();
    assert_eq!(
        (id.id.as_str(), id.revision.as_deref()),
        ("org/name", Some("v1.0"))
    );
    assert_eq!(id.to_string(), "org/name@v1.0");
    let id = HubId::parse("gpt2").unwrap();
    assert_eq!((id.id.as_str(), id.revision()), ("gpt2", "main"));
    assert_eq!(
        HubId::parse("org/name@refs/pr/1").unwrap().revision(),
        "refs/pr/1"
    );
    assert!(HubId::parse("a/b/c").is_none());
    assert!(HubId::parse("org/..").is_none());
}

/// The real guanaco parquet, stored in a fake cache the way `huggingface_hub` stores it.
fn cached_guanaco(cache: &Path) -> FakeRepo {
    let parquet = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/guanaco-llama2-1k/train-00000-of-00001-9ad84bb9cf65a42f.parquet");
    let repo = FakeRepo::new(cache, "datasets", "mlabonne/guanaco-llama2-1k");
    repo.file(C1, "README.md", b"# guanaco")
        .file(
            C1,
            "data/train-00000-of-00001-9ad84bb9cf65a42f.parquet",
            &std::fs::read(parquet).unwrap(),
        )
        .set_ref("main", C1);
    repo
}

#[test]
fn dataset_alias_resolves_to_the_mlabonne_repo() {
    let cache = tempfile::tempdir().unwrap();
    let msg =
        not_found_msg(resolve_dataset_in("guanaco-llama2-1k", &env(cache.path())).unwrap_err());
    assert!(
        msg.starts_with("dataset mlabonne/guanaco-llama2-1k is not in"),
        "{msg}"
    );

    let repo = cached_guanaco(cache.path());
    let e = env(cache.path());
    assert_eq!(
        resolve_dataset_in("guanaco-llama2-1k", &e).unwrap(),
        repo.snapshot(C1)
    );
    assert_eq!(
        resolve_dataset_in("mlabonne/guanaco-llama2-1k", &e).unwrap(),
        repo.snapshot(C1)
    );
}

#[test]
fn cached_dataset_loads_through_symlinks() {
    let cache = tempfile::tempdir().unwrap();
    cached_guanaco(cache.path());
    let dir = resolve_dataset_in("mlabonne/guanaco-llama2-1k", &env(cache.path())).unwrap();
    let rows = qlora::data::load_rows(&dir, None).unwrap();
    assert_eq!(rows.len(), 1000);
    assert!(rows[0].value["text"]
        .as_str()
        .unwrap()
        .starts_with("<s>[INST] "));
}

#[test]
fn dataset_snapshot_without_data_files_is_not_usable() {
    let cache = tempfile::tempdir().unwrap();
    let repo = FakeRepo::new(cache.path(), "datasets", "org/d");
    repo.file(C1, "README.md", b"card only").set_ref("main", C1);
    let msg = not_found_msg(resolve_dataset_in("org/d", &env(cache.path())).unwrap_err());
    assert!(msg.contains("has no data files"), "{msg}");

    repo.link(C1, "data/train-0.jsonl", "feedbeef");
    let why = cached_snapshot(cache.path(), RepoKind::Dataset, "org/d", None).unwrap_err();
    assert!(why.contains("train-0.jsonl is missing"), "{why}");

    std::fs::write(repo.dir.join("blobs/feedbeef"), "{\"text\": \"hi\"}\n").unwrap();
    assert_eq!(
        resolve_dataset_in("org/d", &env(cache.path())).unwrap(),
        repo.snapshot(C1)
    );
}

#[test]
fn env_vars_pick_the_cache_dir_offline_and_token() {
    let vars = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let e = HubEnv::from_vars(vars(&[("HOME", "/home/u")]));
    assert_eq!(e.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
    assert!(!e.offline && e.progress && e.token.is_none());
    assert_eq!(
        e.token_file,
        Some(PathBuf::from("/home/u/.cache/huggingface/token"))
    );

    let e = HubEnv::from_vars(vars(&[
        ("HOME", "/home/u"),
        ("HF_HOME", "/hf"),
        ("HF_HUB_OFFLINE", "1"),
    ]));
    assert_eq!(e.cache_dir, PathBuf::from("/hf/hub"));
    assert!(e.offline);

    let e = HubEnv::from_vars(vars(&[
        ("HF_HOME", "/hf"),
        ("HF_HUB_CACHE", "/cache"),
        ("HF_HUB_OFFLINE", "true"),
        ("HF_TOKEN", "hf_secret"),
    ]));
    assert_eq!(e.cache_dir, PathBuf::from("/cache"));
    assert!(e.offline);
    assert_eq!(e.token.as_deref(), Some("hf_secret"));
    assert!(
        !format!("{e:?}").contains("hf_secret"),
        "Debug must not print the token"
    );

    for off in ["0", "false", ""] {
        let e = HubEnv::from_vars(move |k: &str| (k == "HF_HUB_OFFLINE").then(|| off.to_string()));
        assert!(!e.offline, "HF_HUB_OFFLINE={off:?}");
    }
}

/// A minimal stand-in for the Hub's HTTP API on 127.0.0.1, so the download path (our HTTP client
/// + file selection) runs end to end without the internet. Faults can be injected per file.
mod fake_hub {
    use sha1::Sha1;
    use sha2::{Digest, Sha256};
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    pub const COMMIT: &str = "abcdefabcdefabcdefabcdefabcdefabcdefabcd";

    /// What the server does wrong for one file.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub enum Fault {
        /// Announce the full length but close the connection after `after` body bytes, for the
        /// next `times` requests of the file.
        Truncate { after: usize, times: usize },
        /// Send the right number of bytes, one of them wrong.
        Corrupt,
        /// Announce `delta` more (or fewer) bytes than the file has, in the listing and in
        /// `X-Linked-Size`.
        ListedSize { delta: i64 },
        /// Ignore `Range` and send the whole file with status 200.
        NoRange,
    }

    pub struct Server {
        pub endpoint: String,
        pub requests: Arc<Mutex<Vec<String>>>,
        /// `(file path, first byte asked for)` of every file request.
        pub ranges: Arc<Mutex<Vec<(String, usize)>>>,
        pub faults: Arc<Mutex<HashMap<String, Fault>>>,
    }

    type Repos = HashMap<String, Vec<(String, Vec<u8>)>>;
    /// (URL prefix like `org/m` or `datasets/org/d`, its files as (name, content)).
    pub type RepoSpec<'a> = (&'a str, Vec<(&'a str, Vec<u8>)>);

    struct State {
        repos: Repos,
        /// Whether the listing carries sizes and hashes (`?blobs=true`), as the real Hub's does.
        detailed: bool,
        requests: Arc<Mutex<Vec<String>>>,
        ranges: Arc<Mutex<Vec<(String, usize)>>>,
        faults: Arc<Mutex<HashMap<String, Fault>>>,
    }

    pub fn start(repos: Vec<RepoSpec>) -> Server {
        start_with(repos, false)
    }

    pub fn start_with(repos: Vec<RepoSpec>, detailed: bool) -> Server {
        let repos: Repos = repos
            .into_iter()
            .map(|(r, files)| {
                let files = files.into_iter().map(|(n, b)| (n.to_owned(), b)).collect();
                (r.to_owned(), files)
            })
            .collect();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State {
            repos,
            detailed,
            requests: Arc::default(),
            ranges: Arc::default(),
            faults: Arc::default(),
        });
        let server = Server {
            endpoint,
            requests: state.requests.clone(),
            ranges: state.ranges.clone(),
            faults: state.faults.clone(),
        };
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = serve(stream, &state);
            }
        });
        server
    }

    /// Git's blob id: SHA-1 of `blob <len>\0<content>`.
    pub fn git_blob_id(content: &[u8]) -> String {
        let mut h = Sha1::new();
        h.update(format!("blob {}\0", content.len()).as_bytes());
        h.update(content);
        format!("{:x}", h.finalize())
    }

    /// Files stored with LFS on the Hub (their listing entry has `lfs.sha256`).
    pub fn is_lfs(name: &str) -> bool {
        name.ends_with(".safetensors") || name.ends_with(".parquet")
    }

    fn serve(stream: TcpStream, st: &State) -> std::io::Result<()> {
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut first = String::new();
        reader.read_line(&mut first)?;
        let path = first.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let mut range_start = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(r) = lower.strip_prefix("range: bytes=") {
                range_start = r.split('-').next().unwrap().trim().parse().unwrap_or(0);
            }
        }
        st.requests.lock().unwrap().push(path.clone());
        let (status, headers, body, cut) = respond(&path, range_start, st);
        let mut out = stream;
        write!(out, "HTTP/1.1 {status}\r\nConnection: close\r\n")?;
        for (k, v) in headers {
            write!(out, "{k}: {v}\r\n")?;
        }
        write!(out, "Content-Length: {}\r\n\r\n", body.len())?;
        out.write_all(&body[..cut.unwrap_or(body.len()).min(body.len())])?;
        out.flush()?;
        if cut.is_some() {
            // Drop the connection mid-body.
            let _ = out.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
        let _ = reader.read(&mut [0u8; 0]);
        Ok(())
    }

    type Response = (String, Vec<(String, String)>, Vec<u8>, Option<usize>);

    fn respond(path: &str, start: usize, st: &State) -> Response {
        let not_found = || {
            (
                "404 Not Found".to_owned(),
                vec![],
                b"not found".to_vec(),
                None,
            )
        };
        if path.starts_with("/api/models/org/gated") {
            return (
                "401 Unauthorized".to_owned(),
                vec![],
                b"gated".to_vec(),
                None,
            );
        }
        if let Some(rest) = path.strip_prefix("/api/") {
            // /api/{models|datasets}/{id}/revision/{rev}[?blobs=true]
            let Some((repo, _rev)) = rest.split_once("/revision/") else {
                return not_found();
            };
            let key = repo.strip_prefix("models/").unwrap_or(repo);
            let Some(files) = st.repos.get(key) else {
                return not_found();
            };
            let faults = st.faults.lock().unwrap();
            let siblings: Vec<String> = files
                .iter()
                .map(|(n, b)| {
                    if !st.detailed {
                        return format!("{{\"rfilename\": \"{n}\"}}");
                    }
                    let size = match faults.get(n) {
                        Some(Fault::ListedSize { delta }) => (b.len() as i64 + delta) as usize,
                        _ => b.len(),
                    };
                    let lfs = if is_lfs(n) {
                        format!(
                            ", \"lfs\": {{\"sha256\": \"{:x}\", \"size\": {size}, \"pointerSize\": 130}}",
                            Sha256::digest(b)
                        )
                    } else {
                        String::new()
                    };
                    format!(
                        "{{\"rfilename\": \"{n}\", \"size\": {size}, \"blobId\": \"{}\"{lfs}}}",
                        git_blob_id(b)
                    )
                })
                .collect();
            let body = format!(
                "{{\"sha\": \"{COMMIT}\", \"siblings\": [{}]}}",
                siblings.join(",")
            );
            let headers = vec![("Content-Type".to_owned(), "application/json".to_owned())];
            return ("200 OK".to_owned(), headers, body.into_bytes(), None);
        }
        // /{prefix}/resolve/{rev}/{file}
        let Some((repo, rest)) = path[1..].split_once("/resolve/") else {
            return not_found();
        };
        let file = rest.split_once('/').map(|(_, f)| f).unwrap_or_default();
        let Some(content) = st
            .repos
            .get(repo)
            .and_then(|fs| fs.iter().find(|(n, _)| n == file))
            .map(|(_, b)| b)
        else {
            return not_found();
        };
        st.ranges.lock().unwrap().push((file.to_owned(), start));
        let mut faults = st.faults.lock().unwrap();
        let fault = faults.get(file).copied();
        let etag = if is_lfs(file) {
            format!("{:x}", Sha256::digest(content))
        } else {
            git_blob_id(content)
        };
        let mut headers = vec![
            ("ETag".to_owned(), format!("\"{etag}\"")),
            ("X-Repo-Commit".to_owned(), COMMIT.to_owned()),
        ];
        if is_lfs(file) {
            // What the Hub puts on an LFS file's resolve response (its redirect, really).
            let size = match fault {
                Some(Fault::ListedSize { delta }) => content.len() as i64 + delta,
                _ => content.len() as i64,
            };
            headers.push(("X-Linked-Size".to_owned(), size.to_string()));
            headers.push(("X-Linked-Etag".to_owned(), format!("\"{etag}\"")));
        }
        if fault == Some(Fault::NoRange) {
            return ("200 OK".to_owned(), headers, content.clone(), None);
        }
        let end = content.len().saturating_sub(1);
        headers.push((
            "Content-Range".to_owned(),
            format!("bytes {start}-{end}/{}", content.len()),
        ));
        let mut body = content.get(start..).unwrap_or_default().to_vec();
        let mut cut = None;
        match fault {
            Some(Fault::Corrupt) if !body.is_empty() => {
                let i = body.len() / 2;
                body[i] ^= 0x55;
            }
            Some(Fault::Truncate { after, times }) if times > 0 => {
                cut = Some(after);
                if times == 1 {
                    faults.remove(file);
                } else {
                    faults.insert(
                        file.to_owned(),
                        Fault::Truncate {
                            after,
                            times: times - 1,
                        },
                    );
                }
            }
            _ => {}
        }
        ("206 Partial Content".to_owned(), headers, body, cut)
    }
}

fn online_env(cache: &Path, endpoint: &str) -> Option<HubEnv> {
    // ureq sends even 127.0.0.1 through a proxy named in the environment; skip there.
    let proxied = ["http_proxy", "https_proxy", "all_proxy"].iter().any(|v| {
        std::env::var(v)
            .or_else(|_| std::env::var(v.to_uppercase()))
            .is_ok()
    });
    if proxied {
        eprintln!("skipping the fake-Hub download test: a proxy is configured");
        return None;
    }
    Some(HubEnv {
        cache_dir: cache.to_path_buf(),
        offline: false,
        endpoint: Some(endpoint.to_owned()),
        ..HubEnv::default()
    })
}

#[test]
fn downloads_a_sharded_model_and_a_dataset_from_a_fake_hub() {
    let shards = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let index = index_json(&shards).into_bytes();
    let server = fake_hub::start(vec![
        (
            "org/m",
            vec![
                ("config.json", b"{\"hidden_size\": 8}".to_vec()),
                ("tokenizer.json", b"{}".to_vec()),
                ("generation_config.json", b"{}".to_vec()),
                ("model.safetensors.index.json", index),
                (shards[0], b"first shard".to_vec()),
                (shards[1], b"second shard".to_vec()),
                ("pytorch_model.bin", b"never fetched".to_vec()),
                ("README.md", b"never fetched".to_vec()),
            ],
        ),
        (
            "datasets/org/d",
            vec![
                ("README.md", b"card".to_vec()),
                ("data/test-0.jsonl", b"{\"text\": \"test\"}\n".to_vec()),
                ("data/train-0.jsonl", b"{\"text\": \"train\"}\n".to_vec()),
            ],
        ),
    ]);
    let cache = tempfile::tempdir().unwrap();
    let Some(e) = online_env(cache.path(), &server.endpoint) else {
        return;
    };

    let dir = resolve_model_in("org/m", &e).unwrap();
    assert_eq!(
        dir,
        cache
            .path()
            .join("models--org--m/snapshots")
            .join(fake_hub::COMMIT)
    );
    assert_eq!(std::fs::read(dir.join(shards[1])).unwrap(), b"second shard");
    assert!(dir.join("generation_config.json").is_file());
    assert!(!dir.join("pytorch_model.bin").exists() && !dir.join("README.md").exists());
    assert!(std::fs::symlink_metadata(dir.join(shards[0]))
        .unwrap()
        .file_type()
        .is_symlink());
    // Now cached: resolving offline gives the same snapshot.
    let offline = HubEnv {
        offline: true,
        ..e.clone()
    };
    assert_eq!(resolve_model_in("org/m", &offline).unwrap(), dir);

    let data_dir = resolve_dataset_in("org/d", &e).unwrap();
    assert_eq!(
        data_dir,
        cache
            .path()
            .join("datasets--org--d/snapshots")
            .join(fake_hub::COMMIT)
    );
    assert!(
        !data_dir.join("data/test-0.jsonl").exists(),
        "only the train split is fetched"
    );
    let rows = qlora::data::load_rows(&data_dir, None).unwrap();
    assert_eq!(qlora::data::texts(&rows, "text").unwrap(), vec!["train"]);

    let requests = server.requests.lock().unwrap().clone();
    assert!(
        requests.iter().all(|r| !r.contains("pytorch_model.bin")),
        "{requests:?}"
    );
}

#[test]
fn download_errors_name_the_repo() {
    let server = fake_hub::start(vec![(
        "org/weightless",
        vec![("config.json", b"{}".to_vec())],
    )]);
    let cache = tempfile::tempdir().unwrap();
    let Some(e) = online_env(cache.path(), &server.endpoint) else {
        return;
    };
    let hub_msg = |spec: &str| match resolve_model_in(spec, &e).unwrap_err() {
        Error::Hub(msg) => msg,
        other => panic!("expected Error::Hub, got {other:?}"),
    };
    let msg = hub_msg("org/missing");
    assert!(
        msg.starts_with("org/missing: ") && msg.contains("404"),
        "{msg}"
    );
    assert!(msg.contains("no such repo"), "{msg}");
    let msg = hub_msg("org/gated");
    assert!(msg.contains("401") && msg.contains("HF_TOKEN"), "{msg}");
    let msg = hub_msg("org/weightless");
    assert!(msg.contains("neither model.safetensors nor"), "{msg}");
}

/// Bytes that are not all alike, so a wrong offset or a flipped byte changes the hash.
fn weights_bytes(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i * 31 % 251) as u8 ^ (i >> 8) as u8)
        .collect()
}

/// A one-file model repo on a fake Hub whose listing announces sizes and hashes.
fn weights_server(weights: &[u8]) -> fake_hub::Server {
    fake_hub::start_with(
        vec![(
            "org/w",
            vec![
                ("config.json", b"{\"hidden_size\": 8}".to_vec()),
                ("model.safetensors", weights.to_vec()),
            ],
        )],
        true,
    )
}

fn repo_blobs(cache: &Path) -> PathBuf {
    cache.join("models--org--w/blobs")
}

fn hub_err(r: qlora::Result<PathBuf>) -> String {
    match r {
        Err(Error::Hub(msg)) => msg,
        other => panic!("expected Error::Hub, got {other:?}"),
    }
}

/// The files in the repo's `blobs/` (names only), sorted.
fn blob_names(cache: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(repo_blobs(cache))
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_dropped_connection_is_resumed_with_a_range_request() {
    let weights = weights_bytes(100_000);
    let server = weights_server(&weights);
    server.faults.lock().unwrap().insert(
        "model.safetensors".into(),
        fake_hub::Fault::Truncate {
            after: 30_000,
            times: 1,
        },
    );
    let cache = tempfile::tempdir().unwrap();
    let Some(e) = online_env(cache.path(), &server.endpoint) else {
        return;
    };
    let dir = resolve_model_in("org/w", &e).unwrap();
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        weights
    );
    let ranges: Vec<usize> = server
        .ranges
        .lock()
        .unwrap()
        .iter()
        .filter(|(f, _)| f == "model.safetensors")
        .map(|r| r.1)
        .collect();
    assert_eq!(
        ranges,
        [0, 30_000],
        "the second request resumes at byte 30000"
    );
    assert!(
        !blob_names(cache.path())
            .iter()
            .any(|b| b.ends_with(".incomplete")),
        "{:?}",
        blob_names(cache.path())
    );
}

#[test]
fn an_interrupted_download_is_never_cached_as_complete_and_the_next_run_resumes_it() {
    let weights = weights_bytes(100_000);
    let sha = format!("{:x}", Sha256::digest(&weights));
    let server = weights_server(&weights);
    // Every attempt of this run is cut short: 3 × 30000 bytes arrive.
    server.faults.lock().unwrap().insert(
        "model.safetensors".into(),
        fake_hub::Fault::Truncate {
            after: 30_000,
            times: qlora::hub::DOWNLOAD_ATTEMPTS,
        },
    );
    let cache = tempfile::tempdir().unwrap();
    let Some(e) = online_env(cache.path(), &server.endpoint) else {
        return;
    };
    let msg = hub_err(resolve_model_in("org/w", &e));
    assert!(
        msg.contains("model.safetensors: download interrupted after 90000 of 100000 bytes")
            && msg.contains("the next run resumes it"),
        "{msg}"
    );
    // Nothing claims to be complete: no blob under its final name, no snapshot link, and the
    // cache is not usable offline.
    assert_eq!(
        blob_names(cache.path())
            .iter()
            .filter(|b| **b == sha)
            .count(),
        0
    );
    let part = repo_blobs(cache.path()).join(format!("{sha}.incomplete"));
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 90_000);
    let snapshot = cache
        .path()
        .join("models--org--w/snapshots")
        .join(fake_hub::COMMIT);
    assert!(!snapshot.join("model.safetensors").exists());
    let offline = HubEnv {
        offline: true,
        ..e.clone()
    };
    assert!(resolve_model_in("org/w", &offline).is_err());

    // The next run asks only for the missing 10000 bytes.
    server.ranges.lock().unwrap().clear();
    let dir = resolve_model_in("org/w", &e).unwrap();
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        weights
    );
    let ranges = server.ranges.lock().unwrap().clone();
    assert_eq!(ranges, [("model.safetensors".to_string(), 90_000)]);
    assert!(!part.exists());
    assert_eq!(resolve_model_in("org/w", &offline).unwrap(), dir);
}

#[test]
fn bytes_that_do_not_match_the_announced_hash_are_discarded() {
    let weights = weights_bytes(50_000);
    let server = weights_server(&weights);
    for (file, what) in [
        ("model.safetensors", "SHA-256 mismatch"),
        ("config.json", "git blob id mismatch"),
    ] {
        // A fresh cache each time: a file cached by the previous round is not fetched again.
        let cache = tempfile::tempdir().unwrap();
        let Some(e) = online_env(cache.path(), &server.endpoint) else {
            return;
        };
        server.faults.lock().unwrap().clear();
        server
            .faults
            .lock()
            .unwrap()
            .insert(file.into(), fake_hub::Fault::Corrupt);
        let msg = hub_err(resolve_model_in("org/w", &e));
        assert!(
            msg.contains(&format!("{file}: {what}")) && msg.contains("run again to re-fetch"),
            "{msg}"
        );
        assert!(
            !blob_names(cache.path())
                .iter()
                .any(|b| b.ends_with(".incomplete")),
            "the bad bytes are removed: {:?}",
            blob_names(cache.path())
        );
        server.faults.lock().unwrap().clear();
        let dir = resolve_model_in("org/w", &e).unwrap();
        assert_eq!(
            std::fs::read(dir.join("model.safetensors")).unwrap(),
            weights
        );
    }
}

#[test]
fn the_announced_size_is_enforced() {
    let weights = weights_bytes(20_000);
    let cache = tempfile::tempdir().unwrap();
    for (delta, needle) in [
        (-100, "more than the announced 19900"),
        (100, "download interrupted after 20000 of 20100 bytes"),
    ] {
        let server = weights_server(&weights);
        server.faults.lock().unwrap().insert(
            "model.safetensors".into(),
            fake_hub::Fault::ListedSize { delta },
        );
        let Some(e) = online_env(cache.path(), &server.endpoint) else {
            return;
        };
        let msg = hub_err(resolve_model_in("org/w", &e));
        assert!(msg.contains(needle), "{delta}: {msg}");
        assert!(!cache
            .path()
            .join("models--org--w/snapshots")
            .join(fake_hub::COMMIT)
            .join("model.safetensors")
            .exists());
    }
}

/// The `Range` starts of every request for `model.safetensors`.
fn weight_ranges(server: &fake_hub::Server) -> Vec<(String, usize)> {
    let ranges = server.ranges.lock().unwrap();
    ranges
        .iter()
        .filter(|(f, _)| f == "model.safetensors")
        .cloned()
        .collect()
}

#[test]
fn stale_partial_files_are_discarded_or_refetched() {
    let weights = weights_bytes(40_000);
    let sha = format!("{:x}", Sha256::digest(&weights));
    let cache = tempfile::tempdir().unwrap();
    let part = repo_blobs(cache.path()).join(format!("{sha}.incomplete"));
    std::fs::create_dir_all(part.parent().unwrap()).unwrap();

    // Longer than the file: thrown away, fetched from the start.
    let server = weights_server(&weights);
    let Some(e) = online_env(cache.path(), &server.endpoint) else {
        return;
    };
    std::fs::write(&part, vec![7u8; 40_005]).unwrap();
    let dir = resolve_model_in("org/w", &e).unwrap();
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        weights
    );
    let ranges = weight_ranges(&server);
    assert_eq!(ranges, [("model.safetensors".to_string(), 0)]);

    // Half a file of the wrong bytes: resumed, the hash fails, fetched again from the start.
    let cache2 = tempfile::tempdir().unwrap();
    let server = weights_server(&weights);
    let e = online_env(cache2.path(), &server.endpoint).unwrap();
    let part = repo_blobs(cache2.path()).join(format!("{sha}.incomplete"));
    std::fs::create_dir_all(part.parent().unwrap()).unwrap();
    std::fs::write(&part, vec![7u8; 20_000]).unwrap();
    let dir = resolve_model_in("org/w", &e).unwrap();
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        weights
    );
    let ranges = weight_ranges(&server);
    assert_eq!(
        ranges,
        [
            ("model.safetensors".to_string(), 20_000),
            ("model.safetensors".to_string(), 0)
        ]
    );

    // A server that ignores Range: the partial file is rewritten from byte 0.
    let cache3 = tempfile::tempdir().unwrap();
    let server = weights_server(&weights);
    server
        .faults
        .lock()
        .unwrap()
        .insert("model.safetensors".into(), fake_hub::Fault::NoRange);
    let e = online_env(cache3.path(), &server.endpoint).unwrap();
    let part = repo_blobs(cache3.path()).join(format!("{sha}.incomplete"));
    std::fs::create_dir_all(part.parent().unwrap()).unwrap();
    std::fs::write(&part, &weights[..10_000]).unwrap();
    let dir = resolve_model_in("org/w", &e).unwrap();
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        weights
    );
}

#[test]
fn a_hostile_listing_cannot_write_outside_the_cache() {
    let server = fake_hub::start_with(
        vec![(
            "org/evil",
            vec![
                ("config.json", b"{}".to_vec()),
                ("../../escape.safetensors", b"x".to_vec()),
            ],
        )],
        true,
    );
    let cache = tempfile::tempdir().unwrap();
    let Some(e) = online_env(cache.path(), &server.endpoint) else {
        return;
    };
    let msg = hub_err(resolve_model_in("org/evil", &e));
    assert!(msg.contains("not a relative path inside the repo"), "{msg}");
}

#[test]
fn without_a_detailed_listing_the_resolve_headers_are_checked() {
    // An older mirror: the listing names files only; X-Linked-Size and X-Linked-Etag (SHA-256)
    // on the resolve response announce what the download must match.
    let weights = weights_bytes(30_000);
    for (fault, needle) in [
        (
            fake_hub::Fault::Corrupt,
            "model.safetensors: SHA-256 mismatch",
        ),
        (
            fake_hub::Fault::ListedSize { delta: -100 },
            "more than the announced 29900",
        ),
        (
            fake_hub::Fault::ListedSize { delta: 100 },
            "download interrupted after 30000 of 30100 bytes",
        ),
    ] {
        let server = fake_hub::start_with(
            vec![(
                "org/w",
                vec![
                    ("config.json", b"{\"hidden_size\": 8}".to_vec()),
                    ("model.safetensors", weights.clone()),
                ],
            )],
            false,
        );
        let cache = tempfile::tempdir().unwrap();
        let Some(e) = online_env(cache.path(), &server.endpoint) else {
            return;
        };
        server
            .faults
            .lock()
            .unwrap()
            .insert("model.safetensors".into(), fault);
        let msg = hub_err(resolve_model_in("org/w", &e));
        assert!(msg.contains(needle), "{fault:?}: {msg}");
        assert!(!cache
            .path()
            .join("models--org--w/snapshots")
            .join(fake_hub::COMMIT)
            .join("model.safetensors")
            .exists());
        server.faults.lock().unwrap().clear();
        let dir = resolve_model_in("org/w", &e).unwrap();
        assert_eq!(
            std::fs::read(dir.join("model.safetensors")).unwrap(),
            weights
        );
    }
}
