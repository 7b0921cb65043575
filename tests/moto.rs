//! Test services for publishing: moto in server mode (a local EC2/EBS stand-in) and a proxy in
//! front of it that records every request kiln sends and can inject faults. moto accepts
//! nearly anything and drops most RegisterImage fields, so assertions about what kiln sends
//! are made against the recorded requests and the AWS API reference, not moto's state.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common;

/// A moto_server child process on 127.0.0.1, killed on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
}

/// Where `.ci/setup-moto` installs moto (and with it botocore).
fn moto_venv() -> PathBuf {
    std::env::var_os("KILN_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|| "/var/cache/kiln".into()).join("moto-venv")
}

impl Moto {
    /// None (with a SKIP line) locally when moto is not installed; a panic in CI.
    pub fn start() -> Option<Moto> {
        let bin = moto_venv().join("bin/moto_server");
        if !bin.is_file() {
            if common::in_ci() {
                panic!("{} is missing; .ci/setup-moto should have installed it", bin.display());
            }
            eprintln!("SKIP: moto is not installed (run .ci/setup-moto)");
            return None;
        }
        let port = free_port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let m = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not listen on port {port} within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(m)
    }
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Throwaway credentials and a fixed region for a kiln command talking to moto; never real
/// ones, and nothing from the developer's own AWS configuration leaks in.
pub fn fake_aws_env(c: &mut Command) -> &mut Command {
    c.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_SESSION_TOKEN", "testing")
        .env("AWS_REGION", "us-east-1")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
}

/// One request as kiln sent it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Lower-case names.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// Set when the proxy answered with an injected fault instead of forwarding.
    pub faulted: bool,
}

impl Recorded {
    /// The EC2 query API action (`Action=RegisterImage`), or the EBS operation by route.
    pub fn action(&self) -> String {
        if let Some(a) = self.form().get("Action") {
            return a.clone();
        }
        // JSON protocols (SSM): `X-Amz-Target: AmazonSSM.PutParameter`.
        if let Some(t) = self.header("x-amz-target") {
            return t.rsplit('.').next().unwrap_or(t).to_string();
        }
        let p = self.path.split('?').next().unwrap_or("");
        match (self.method.as_str(), p) {
            ("PUT", p) if p.contains("/blocks/") => "PutSnapshotBlock".into(),
            ("POST", "/snapshots") => "StartSnapshot".into(),
            ("POST", p) if p.starts_with("/snapshots/completion/") => "CompleteSnapshot".into(),
            ("GET", p) if p.contains("/blocks/") => "GetSnapshotBlock".into(),
            ("GET", p) if p.ends_with("/blocks") => "ListSnapshotBlocks".into(),
            _ => format!("{} {}", self.method, p),
        }
    }
    /// The form-encoded body of an EC2 query request, decoded.
    pub fn form(&self) -> BTreeMap<String, String> {
        let text = String::from_utf8_lossy(&self.body);
        if !text.starts_with("Action=") && !text.contains("&Action=") {
            return BTreeMap::new();
        }
        text.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (url_decode(k), url_decode(v))).collect()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
    /// The region the request was signed for (SigV4 credential scope).
    pub fn region(&self) -> String {
        let auth = self.header("authorization").unwrap_or("");
        auth.split("Credential=").nth(1).and_then(|c| c.split('/').nth(2)).unwrap_or("").to_string()
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the proxy does to requests.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Deterministic faults (seeded): about `percent`% of requests are dropped or answered with
    /// 500/503/throttling, never more than 3 in a row so bounded retries always get through.
    Faults { seed: u64, percent: u64 },
    /// Answer every request of this action with 403 AccessDenied (a non-retryable error).
    Deny { action: String },
    /// Forward the first `n` requests of `action`, then deny the rest with 403.
    DenyAfter { action: String, n: usize },
    /// Forward every request of this action `ms` milliseconds late (an upload slow enough to
    /// be killed in the middle).
    Slow { action: String, ms: u64 },
    /// Forward the first request of this action, then drop the connection instead of passing
    /// its answer on: the server did the work, the client never hears of it.
    LoseFirstReply { action: String },
    /// Forward the first request of this action at once, then hold its answer `ms`
    /// milliseconds (past the client's per-request timeout) before sending it: the server did
    /// the work, the client gave up waiting and tried again.
    AnswerFirstLate { action: String, ms: u64 },
    /// Report this snapshot in state `error` in every DescribeSnapshots answer that names it:
    /// what a pending snapshot becomes when its timeout passes (moto never expires one).
    ExpireSnapshot { snapshot_id: String },
    /// Answer the first `n` requests of `action` with HTTP 400 and this EC2 error code (a
    /// refusal that is not a fault: `ResourceLimitExceeded` at the concurrent-copy limit).
    RefuseFirst { action: String, code: &'static str, n: usize },
    /// Every image in this region's DescribeImages answers stays `pending`: a copy that never
    /// finishes (and reports no progress).
    Stuck { region: String },
    /// Every CopyImage into this region makes an AMI that DescribeImages reports `failed` from
    /// then on, whatever the mode later (a copy that failed for good).
    FailCopies { region: String },
    /// Answer every S3 PutObject with this error, as S3 words it (XML `<Error>` body).
    S3PutError { status: u16, code: &'static str, message: &'static str },
}

pub struct Proxy {
    pub port: u16,
    pub log: Arc<Mutex<Vec<Recorded>>>,
    /// Every request since the start, `clear` or not: judged by botocore's models on drop.
    all: Arc<Mutex<Vec<Recorded>>>,
    pub mode: Arc<Mutex<Mode>>,
    /// Paths of forwarded requests whose 2xx answer was handed to the client in full.
    pub answered: Arc<Mutex<Vec<String>>>,
    block_public: Arc<Mutex<BTreeMap<String, String>>>,
    images: Arc<Mutex<BTreeMap<String, ImageExtra>>>,
}

/// What EC2 knows of an AMI that moto does not model: deregistration protection, the
/// disabled state, what refers to it and when it was last launched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageExtra {
    pub protection: Option<String>,
    pub disabled: bool,
    /// (resource type, ARN) of what refers to the AMI.
    pub references: Vec<(String, String)>,
    pub last_launched: Option<String>,
}

struct Shared {
    upstream: u16,
    /// AMI id → what the stand-ins answer for it (see [`ImageExtra`]).
    images: Arc<Mutex<BTreeMap<String, ImageExtra>>>,
    /// AMI id → the root snapshot its RegisterImage named (see `root_snapshots`).
    roots: Mutex<BTreeMap<String, String>>,
    /// AMIs reported `failed` (see `Mode::FailCopies`).
    failed_images: Mutex<BTreeSet<String>>,
    /// Region → image block public access state (`unblocked` unless set).
    block_public: Arc<Mutex<BTreeMap<String, String>>>,
    log: Arc<Mutex<Vec<Recorded>>>,
    all: Arc<Mutex<Vec<Recorded>>>,
    mode: Arc<Mutex<Mode>>,
    answered: Arc<Mutex<Vec<String>>>,
    rng: Mutex<(u64, u32)>,
    counts: Mutex<BTreeMap<String, usize>>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to moto on `upstream`. The listener
    /// thread lives until the test process ends; each test has its own proxy.
    pub fn start(upstream: u16, mode: Mode) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let all = Arc::new(Mutex::new(Vec::new()));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let mode = Arc::new(Mutex::new(mode));
        let block_public = Arc::new(Mutex::new(BTreeMap::new()));
        let images = Arc::new(Mutex::new(BTreeMap::new()));
        let seed = match &*mode.lock().unwrap() {
            Mode::Faults { seed, .. } => *seed,
            _ => 0,
        };
        let shared = Arc::new(Shared {
            upstream,
            images: images.clone(),
            roots: Mutex::new(BTreeMap::new()),
            failed_images: Mutex::new(BTreeSet::new()),
            block_public: block_public.clone(),
            log: log.clone(),
            all: all.clone(),
            mode: mode.clone(),
            answered: answered.clone(),
            rng: Mutex::new((seed, 0)),
            counts: Mutex::new(BTreeMap::new()),
        });
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &shared);
                });
            }
        });
        Proxy { port, log, all, mode, answered, block_public, images }
    }
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    /// What the stand-ins hold for `image_id` (protection, disabled, references, last launch).
    pub fn image(&self, image_id: &str) -> ImageExtra {
        self.images.lock().unwrap().get(image_id).cloned().unwrap_or_default()
    }
    /// Changes what EC2 would say of `image_id` (a launch template that refers to it, a launch).
    pub fn set_image(&self, image_id: &str, f: impl FnOnce(&mut ImageExtra)) {
        f(self.images.lock().unwrap().entry(image_id.to_string()).or_default())
    }
    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().clone()
    }
    pub fn set_mode(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }
    pub fn clear(&self) {
        self.log.lock().unwrap().clear();
        self.answered.lock().unwrap().clear();
    }
    pub fn answered(&self) -> Vec<String> {
        self.answered.lock().unwrap().clone()
    }
    /// What GetImageBlockPublicAccessState answers in `region` (moto lacks the API).
    pub fn set_block_public_access(&self, region: &str, state: &str) {
        self.block_public.lock().unwrap().insert(region.into(), state.into());
    }
}

/// Every request a test made kiln send must be one the AWS service models accept, whatever
/// moto made of it: checked when the test's proxy goes away (unless the test already failed).
impl Drop for Proxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let all = self.all.lock().unwrap().clone();
        if let Err(problems) = model_problems(&all) {
            panic!("requests the AWS service models refuse:\n{problems}");
        }
    }
}

/// Judges `reqs` by botocore's service models (`tests/model_check.py`, run with the moto
/// venv's Python, where botocore comes with moto): Err with one line per violation.
pub fn model_problems(reqs: &[Recorded]) -> Result<(), String> {
    use base64::Engine as _;
    if reqs.is_empty() {
        return Ok(());
    }
    let python = moto_venv().join("bin/python");
    let dir = common::tempdir();
    let file = dir.path().join("requests.json");
    let json: Vec<serde_json::Value> = reqs
        .iter()
        .map(|r| {
            serde_json::json!({
                "method": r.method,
                "path": r.path,
                "headers": r.headers,
                "body_b64": base64::engine::general_purpose::STANDARD.encode(&r.body),
            })
        })
        .collect();
    std::fs::write(&file, serde_json::to_vec(&json).unwrap()).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/model_check.py");
    let out = Command::new(&python).arg(script).arg(&file).output().expect("the moto venv's Python runs");
    match out.status.code() {
        Some(0) => Ok(()),
        Some(1) => Err(String::from_utf8_lossy(&out.stdout).into_owned()),
        _ => panic!("tests/model_check.py failed: {}", String::from_utf8_lossy(&out.stderr)),
    }
}

fn read_request(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Recorded>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.trim_end().splitn(3, ' ');
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(Recorded { method, path, headers, body, faulted: false }))
}

enum Fault {
    Drop,
    Delay(u64),
    LoseReply,
    AnswerLate(u64),
    Expire(String),
    /// Forward, then report every image in the answer `pending`.
    Pending,
    Status(u16, &'static str, &'static str),
    S3(u16, &'static str, &'static str),
}

impl Shared {
    /// Counts one more request of `action`: which one this is, from 1.
    fn count(&self, action: &str) -> usize {
        let mut c = self.counts.lock().unwrap();
        let k = c.entry(action.to_string()).or_insert(0);
        *k += 1;
        *k
    }
}

fn decide(shared: &Shared, req: &Recorded) -> Option<Fault> {
    let action = req.action();
    let mode = shared.mode.lock().unwrap().clone();
    match mode {
        Mode::Pass => None,
        Mode::S3PutError { status, code, message } => {
            (req.method == "PUT" && !req.path.starts_with("/snapshots")).then_some(Fault::S3(status, code, message))
        }
        Mode::Slow { action: a, ms } => (a == action).then_some(Fault::Delay(ms)),
        Mode::LoseFirstReply { action: a } => (a == action && shared.count(&a) == 1).then_some(Fault::LoseReply),
        Mode::AnswerFirstLate { action: a, ms } => {
            (a == action && shared.count(&a) == 1).then_some(Fault::AnswerLate(ms))
        }
        Mode::ExpireSnapshot { snapshot_id } => (action == "DescribeSnapshots"
            && req.form().iter().any(|(k, v)| k.starts_with("SnapshotId") && *v == snapshot_id))
        .then_some(Fault::Expire(snapshot_id)),
        Mode::RefuseFirst { action: a, code, n } => {
            (a == action && shared.count(&a) <= n).then_some(Fault::Status(400, code, "kiln test proxy: refused"))
        }
        Mode::Stuck { region } => (action == "DescribeImages" && req.region() == region).then_some(Fault::Pending),
        Mode::FailCopies { .. } => None,
        Mode::Deny { action: a } => {
            (a == action).then_some(Fault::Status(403, "AccessDeniedException", "kiln test proxy: access denied"))
        }
        Mode::DenyAfter { action: a, n } => (a == action && shared.count(&a) > n).then_some(Fault::Status(
            403,
            "AccessDeniedException",
            "kiln test proxy: access denied",
        )),
        Mode::Faults { percent, .. } => {
            let mut g = shared.rng.lock().unwrap();
            g.0 = g.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = g.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            if z % 100 >= percent || g.1 >= 3 {
                g.1 = 0;
                return None;
            }
            g.1 += 1;
            Some(match (z >> 8) % 4 {
                0 => Fault::Drop,
                1 => Fault::Status(500, "InternalError", "kiln test proxy: injected 500"),
                2 => Fault::Status(503, "ServiceUnavailable", "kiln test proxy: injected 503"),
                _ => {
                    if req.form().contains_key("Action") {
                        Fault::Status(503, "RequestLimitExceeded", "kiln test proxy: injected throttling")
                    } else {
                        Fault::Status(429, "RequestThrottledException", "kiln test proxy: injected throttling")
                    }
                }
            })
        }
    }
}

fn serve(conn: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    while let Some(mut req) = read_request(&mut reader)? {
        let fault = decide(shared, &req);
        req.faulted = fault.as_ref().is_some_and(|f| {
            !matches!(f, Fault::Delay(_) | Fault::LoseReply | Fault::AnswerLate(_) | Fault::Expire(_) | Fault::Pending)
        });
        shared.log.lock().unwrap().push(req.clone());
        shared.all.lock().unwrap().push(req.clone());
        match fault {
            Some(Fault::Drop) => {
                let _ = out.shutdown(Shutdown::Both);
                return Ok(());
            }
            Some(Fault::LoseReply) => {
                let _ = forward(shared.upstream, &req)?;
                let _ = out.shutdown(Shutdown::Both);
                return Ok(());
            }
            Some(Fault::AnswerLate(ms)) => {
                let resp = forward(shared.upstream, &req)?;
                std::thread::sleep(std::time::Duration::from_millis(ms));
                // The client has most likely hung up by now; what it would have read is lost.
                let _ = out.write_all(&resp).and_then(|()| out.flush());
                return Ok(());
            }
            Some(Fault::Expire(id)) => {
                let resp = String::from_utf8_lossy(&forward(shared.upstream, &req)?).into_owned();
                let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
                assert!(body.contains(&id), "DescribeSnapshots answered without {id}: {body}");
                let mut body = body.to_string();
                for state in ["pending", "completed"] {
                    body = body.replace(&format!("<status>{state}</status>"), "<status>error</status>");
                }
                out.write_all(&with_body(head, &body))?;
                out.flush()?;
            }
            Some(Fault::Pending) => {
                let resp = root_snapshots(shared, &req, forward(shared.upstream, &req)?);
                let resp = String::from_utf8_lossy(&resp).into_owned();
                let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
                let body = body.replace("<imageState>available</imageState>", "<imageState>pending</imageState>");
                out.write_all(&with_body(head, &body))?;
                out.flush()?;
            }
            Some(Fault::Status(status, code, msg)) => {
                let (ctype, body) = if req.form().contains_key("Action") {
                    ("text/xml", format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>{code}</Code><Message>{msg}</Message></Error></Errors><RequestID>kiln-test</RequestID></Response>"))
                } else {
                    ("application/json", format!("{{\"message\":\"{msg}\"}}"))
                };
                write!(out, "HTTP/1.1 {status} Error\r\nContent-Type: {ctype}\r\nx-amzn-ErrorType: {code}\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
                out.flush()?;
            }
            Some(Fault::S3(status, code, msg)) => {
                let body = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{msg}</Message><RequestId>kiln-test</RequestId></Error>");
                write!(
                    out,
                    "HTTP/1.1 {status} Error\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )?;
                out.flush()?;
            }
            Some(Fault::Delay(_)) | None => {
                if let Some(Fault::Delay(ms)) = fault {
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
                let resp = match stand_in(shared, &req) {
                    Some(r) => r,
                    None => root_snapshots(shared, &req, forward(shared.upstream, &req)?),
                };
                out.write_all(&resp)?;
                out.flush()?;
                if resp.starts_with(b"HTTP/1.1 2") || resp.starts_with(b"HTTP/1.0 2") {
                    shared.answered.lock().unwrap().push(req.path.clone());
                }
            }
        }
    }
    Ok(())
}

/// A response whose body the proxy rewrote: the head as it was, its length the new body's.
fn with_body(head: &str, body: &str) -> Vec<u8> {
    let head: Vec<&str> =
        head.split("\r\n").filter(|l| !l.to_ascii_lowercase().starts_with("content-length:")).collect();
    format!("{}\r\ncontent-length: {}\r\n\r\n{body}", head.join("\r\n"), body.len()).into_bytes()
}

/// Answers for the calls moto does not implement, as EC2 words them; what kiln sent is judged
/// by the botocore models like every other request.
fn stand_in(shared: &Shared, req: &Recorded) -> Option<Vec<u8>> {
    let action = req.action();
    let form = req.form();
    let image = form.get("ImageId").cloned().unwrap_or_default();
    let mut images = shared.images.lock().unwrap();
    let body = match action.as_str() {
        "EnableImageDeprecation" => "<return>true</return>".to_string(),
        "EnableImageDeregistrationProtection" => {
            let cooldown = form.get("WithCooldown").is_some_and(|v| v == "true");
            let state = if cooldown { "enabled-with-cooldown" } else { "enabled" };
            images.entry(image).or_default().protection = Some(state.into());
            format!("<return>{state}</return>")
        }
        "DisableImageDeregistrationProtection" => {
            let e = images.entry(image).or_default();
            e.protection = Some(if e.protection.as_deref() == Some("enabled-with-cooldown") {
                "disabled-until 2099-01-01T00:00:00Z".into()
            } else {
                "disabled".into()
            });
            "<return>disabled</return>".into()
        }
        "DisableImage" | "EnableImage" => {
            images.entry(image).or_default().disabled = action == "DisableImage";
            "<return>true</return>".into()
        }
        "DescribeImageReferences" => {
            let mut items = String::new();
            for n in 1.. {
                let Some(id) = form.get(&format!("ImageId.{n}")) else { break };
                for (kind, arn) in images.get(id).map(|e| e.references.clone()).unwrap_or_default() {
                    items.push_str(&format!(
                        "<item><imageId>{id}</imageId><resourceType>{kind}</resourceType><arn>{arn}</arn></item>"
                    ));
                }
            }
            format!("<imageReferenceSet>{items}</imageReferenceSet>")
        }
        // EC2 refuses to deregister a protected AMI; kiln must never ask.
        "DeregisterImage"
            if images.get(&image).and_then(|e| e.protection.as_deref()).is_some_and(|p| p != "disabled") =>
        {
            let xml = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>OperationNotPermitted</Code><Message>{image} has deregistration protection</Message></Error></Errors><RequestID>kiln-test</RequestID></Response>");
            return Some(
                format!(
                    "HTTP/1.1 400 Bad Request\r\ncontent-type: text/xml\r\ncontent-length: {}\r\n\r\n{xml}",
                    xml.len()
                )
                .into_bytes(),
            );
        }
        "GetImageBlockPublicAccessState" => {
            let state = shared.block_public.lock().unwrap().get(&req.region()).cloned();
            format!(
                "<imageBlockPublicAccessState>{}</imageBlockPublicAccessState><managedBy>account</managedBy>",
                state.as_deref().unwrap_or("unblocked")
            )
        }
        _ => return None,
    };
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><{action}Response xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>kiln-test</requestId>{body}</{action}Response>"
    );
    Some(
        format!("HTTP/1.1 200 OK\r\ncontent-type: text/xml\r\ncontent-length: {}\r\n\r\n{xml}", xml.len()).into_bytes(),
    )
}

/// moto's RegisterImage keeps only the name and description: the AMI it makes points at a
/// snapshot of moto's own, not the one in the request's block device mapping. The proxy
/// remembers the root snapshot each RegisterImage asked for and puts it back into the
/// DescribeImages answers, so an AMI reads back as EC2 would return it (what retention judges
/// snapshots by).
fn root_snapshots(shared: &Shared, req: &Recorded, resp: Vec<u8>) -> Vec<u8> {
    let ok = resp.starts_with(b"HTTP/1.1 2") || resp.starts_with(b"HTTP/1.0 2");
    let text = String::from_utf8_lossy(&resp).into_owned();
    let tag = |t: &str, from: &str| -> Option<String> {
        let start = from.find(&format!("<{t}>"))? + t.len() + 2;
        Some(from[start..start + from[start..].find('<')?].to_string())
    };
    match req.action().as_str() {
        "RegisterImage" if ok => {
            if let (Some(id), Some(snap)) =
                (tag("imageId", &text), req.form().get("BlockDeviceMapping.1.Ebs.SnapshotId"))
            {
                shared.roots.lock().unwrap().insert(id, snap.clone());
            }
            resp
        }
        // moto ignores CopyImage's TagSpecifications; EC2 tags the new AMI at once, which is
        // how a re-run finds a copy that is still pending. Applied here with a CreateTags.
        "CopyImage" if ok => {
            let Some(id) = tag("imageId", &text) else { return resp };
            if matches!(&*shared.mode.lock().unwrap(), Mode::FailCopies { region } if *region == req.region()) {
                shared.failed_images.lock().unwrap().insert(id.clone());
            }
            let form = req.form();
            let mut body = format!("Action=CreateTags&Version=2016-11-15&ResourceId.1={id}");
            for spec in 1.. {
                let Some(kind) = form.get(&format!("TagSpecification.{spec}.ResourceType")) else { break };
                if kind != "image" {
                    continue;
                }
                for n in 1.. {
                    let (Some(k), Some(v)) = (
                        form.get(&format!("TagSpecification.{spec}.Tag.{n}.Key")),
                        form.get(&format!("TagSpecification.{spec}.Tag.{n}.Value")),
                    ) else {
                        break;
                    };
                    body.push_str(&format!("&Tag.{n}.Key={}&Tag.{n}.Value={}", url_encode(k), url_encode(v)));
                }
            }
            let mut headers = req.headers.clone();
            headers.insert("content-length".into(), body.len().to_string());
            let create =
                Recorded { method: "POST".into(), path: "/".into(), headers, body: body.into_bytes(), faulted: false };
            let tagged = forward(shared.upstream, &create).unwrap_or_default();
            assert!(
                tagged.starts_with(b"HTTP/1.1 2"),
                "tagging the copy {id} failed: {}",
                String::from_utf8_lossy(&tagged)
            );
            resp
        }
        "DescribeImages" if ok => {
            let roots = shared.roots.lock().unwrap().clone();
            let Some((head, body)) = text.split_once("\r\n\r\n") else { return resp };
            let Ok(doc) = roxmltree::Document::parse(body) else { return resp };
            // Each image of the answer (imagesSet/item) that kiln registered: the text of the
            // first snapshotId in its block device mapping, replaced by the requested one.
            let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
            for image in doc.descendants().filter(|n| n.has_tag_name("item")) {
                if !image.parent().is_some_and(|p| p.has_tag_name("imagesSet")) {
                    continue;
                }
                let Some(id) = image.children().find(|c| c.has_tag_name("imageId")).and_then(|n| n.text()) else {
                    continue;
                };
                let Some(snap) = roots.get(id) else { continue };
                let old = image
                    .children()
                    .find(|c| c.has_tag_name("blockDeviceMapping"))
                    .and_then(|m| m.descendants().find(|n| n.has_tag_name("snapshotId")))
                    .and_then(|n| n.first_child());
                if let Some(t) = old {
                    edits.push((t.range(), snap.clone()));
                }
            }
            let failed = shared.failed_images.lock().unwrap().clone();
            for image in doc.descendants().filter(|n| n.has_tag_name("item")) {
                let id = image.children().find(|c| c.has_tag_name("imageId")).and_then(|n| n.text());
                if !id.is_some_and(|id| failed.contains(id)) {
                    continue;
                }
                if let Some(t) = image.children().find(|c| c.has_tag_name("imageState")).and_then(|n| n.first_child()) {
                    if t.text() != Some("deregistered") {
                        edits.push((t.range(), "failed".into()));
                    }
                }
            }
            // What moto does not model, as EC2 reports it on each image.
            let extras = shared.images.lock().unwrap().clone();
            for image in doc.descendants().filter(|n| n.has_tag_name("item")) {
                if !image.parent().is_some_and(|p| p.has_tag_name("imagesSet")) {
                    continue;
                }
                let id = image.children().find(|c| c.has_tag_name("imageId")).and_then(|n| n.text());
                let Some(extra) = id.and_then(|id| extras.get(id)) else { continue };
                let mut add = String::new();
                if let Some(p) = &extra.protection {
                    add.push_str(&format!("<deregistrationProtection>{p}</deregistrationProtection>"));
                }
                if let Some(t) = &extra.last_launched {
                    add.push_str(&format!("<lastLaunchedTime>{t}</lastLaunchedTime>"));
                }
                let end = image.range().end - "</item>".len();
                edits.push((end..end, add));
                if extra.disabled {
                    if let Some(t) =
                        image.children().find(|c| c.has_tag_name("imageState")).and_then(|n| n.first_child())
                    {
                        edits.push((t.range(), "disabled".into()));
                    }
                }
            }
            let mut body = body.to_string();
            edits.sort_by_key(|e| std::cmp::Reverse(e.0.start));
            for (range, snap) in edits {
                body.replace_range(range, &snap);
            }
            with_body(head, &body)
        }
        _ => resp,
    }
}

/// Sends one request to moto on a fresh connection and returns the whole response; the
/// response is re-framed with Content-Length so the client's connection can stay open.
fn forward(port: u16, req: &Recorded) -> std::io::Result<Vec<u8>> {
    let mut up = TcpStream::connect(("127.0.0.1", port))?;
    let mut head = format!("{} {} HTTP/1.1\r\n", req.method, req.path);
    for (k, v) in &req.headers {
        if k == "connection" || k == "expect" {
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("connection: close\r\n\r\n");
    up.write_all(head.as_bytes())?;
    up.write_all(&req.body)?;
    let mut raw = Vec::new();
    up.read_to_end(&mut raw)?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4).unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split..].to_vec();
    let mut lines: Vec<&str> = head.trim_end().split("\r\n").collect();
    let chunked = lines.iter().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.to_ascii_lowercase().contains("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    lines.retain(|l| {
        let l = l.to_ascii_lowercase();
        !(l.starts_with("content-length:") || l.starts_with("transfer-encoding:") || l.starts_with("connection:"))
    });
    let mut out = lines.join("\r\n");
    out.push_str(&format!("\r\ncontent-length: {}\r\n\r\n", body.len()));
    let mut v = out.into_bytes();
    v.extend_from_slice(&body);
    Ok(v)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(p) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..p]).trim().split(';').next().unwrap_or("0"), 16)
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[p + 2..p + 2 + n]);
        b = &b[p + 2 + n + 2..];
    }
    out
}
