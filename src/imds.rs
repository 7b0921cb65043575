//! An EC2 instance metadata service (IMDS) on this machine, for launching an image the way EC2
//! launches it (`kiln test`).
//!
//! It answers what cloud-init's EC2 data source and other first-boot agents ask for: the IMDSv2
//! token flow (`PUT /latest/api/token` with a TTL header, then every request carrying
//! `X-aws-ec2-metadata-token`), the `meta-data/` tree (directories listed one child per line,
//! `public-keys/` as `0=name`), `user-data`, and `dynamic/instance-identity/document`. When the
//! instance requires IMDSv2, a request without a token gets 401, as on EC2. Every request is
//! logged, so a report can say what the guest asked for.
//!
//! [`Imds::handle`] is pure request → response and is tested on its own; [`Server`] puts it on
//! a loopback port. The guest reaches it at 169.254.169.254 through QEMU's `guestfwd`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Metadata API versions cloud-init and the AWS SDKs ask for, besides `latest`.
const VERSIONS: [&str; 6] = ["1.0", "2009-04-04", "2016-09-02", "2018-09-24", "2021-01-03", "2021-03-23"];

/// EC2 accepts token TTLs from 1 second to 6 hours.
const MAX_TOKEN_TTL_SECS: u64 = 21_600;

const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// What one instance is told about itself.
#[derive(Debug, Clone)]
pub struct InstanceMetadata {
    pub instance_id: String,
    pub ami_id: String,
    pub instance_type: String,
    pub region: String,
    pub availability_zone: String,
    pub account_id: String,
    /// `x86_64` or `arm64`, as the identity document says.
    pub architecture: String,
    pub local_hostname: String,
    pub local_ipv4: String,
    /// The subnet `local_ipv4` is in, as CIDR.
    pub subnet_cidr: String,
    /// Lower-case, colon-separated: the guest NIC's MAC.
    pub mac: String,
    /// `(key name, OpenSSH public key line)`; index 0 is the launch key.
    pub public_keys: Vec<(String, String)>,
    pub user_data: Option<Vec<u8>>,
    /// `HttpTokens = required`: requests without a token are refused with 401.
    pub tokens_required: bool,
}

impl InstanceMetadata {
    /// A plausible instance (t3.micro in us-east-1a, on 169.254.0.0/16) with no keys and no
    /// user data, for tests and examples to start from.
    pub fn sample() -> InstanceMetadata {
        InstanceMetadata {
            instance_id: "i-0123456789abcdef0".into(),
            ami_id: "ami-0123456789abcdef0".into(),
            instance_type: "t3.micro".into(),
            region: "us-east-1".into(),
            availability_zone: "us-east-1a".into(),
            account_id: "123456789012".into(),
            architecture: "x86_64".into(),
            local_hostname: "ip-169-254-0-15.ec2.internal".into(),
            local_ipv4: "169.254.0.15".into(),
            subnet_cidr: "169.254.0.0/16".into(),
            mac: "02:00:00:00:00:01".into(),
            public_keys: vec![],
            user_data: None,
            tokens_required: false,
        }
    }
}

/// One request, as much of it as IMDS looks at.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Lower-case header names.
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn get(path: &str) -> Request {
        Request { method: "GET".into(), path: path.into(), headers: vec![] }
    }
    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_ascii_lowercase(), value.to_string()));
        self
    }
    fn header_value(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Response {
    fn text(status: u16, body: impl Into<Vec<u8>>) -> Response {
        Response { status, body: body.into(), headers: vec![("Content-Type".into(), "text/plain".into())] }
    }
    fn not_found() -> Response {
        Response::text(404, "Not Found")
    }
}

/// One logged request.
#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    /// Seconds since the service started.
    pub at_secs: f64,
    pub method: String,
    pub path: String,
    pub status: u16,
    /// The request carried a valid IMDSv2 token.
    pub with_token: bool,
}

/// The service: metadata, the tokens handed out, and the request log.
pub struct Imds {
    md: InstanceMetadata,
    /// `meta-data/` leaves by path (`placement/availability-zone`).
    tree: BTreeMap<String, String>,
    tokens: Mutex<HashMap<String, Instant>>,
    log: Mutex<Vec<LogEntry>>,
    started: Instant,
}

impl Imds {
    pub fn new(md: InstanceMetadata) -> Imds {
        let tree = meta_data_tree(&md);
        Imds { md, tree, tokens: Mutex::new(HashMap::new()), log: Mutex::new(Vec::new()), started: Instant::now() }
    }

    pub fn metadata(&self) -> &InstanceMetadata {
        &self.md
    }

    /// Every request so far, in arrival order.
    pub fn log(&self) -> Vec<LogEntry> {
        self.log.lock().expect("log lock").clone()
    }

    pub fn handle(&self, req: &Request) -> Response {
        let (resp, with_token) = self.respond(req);
        self.log.lock().expect("log lock").push(LogEntry {
            at_secs: self.started.elapsed().as_secs_f64(),
            method: req.method.clone(),
            path: req.path.clone(),
            status: resp.status,
            with_token,
        });
        resp
    }

    fn respond(&self, req: &Request) -> (Response, bool) {
        let path = req.path.split('?').next().unwrap_or("");
        if path == "/latest/api/token" {
            return (self.issue_token(req), false);
        }
        if req.method != "GET" && req.method != "HEAD" {
            return (Response::text(405, "Method Not Allowed"), false);
        }
        let with_token = match req.header_value(TOKEN_HEADER) {
            Some(t) => {
                let live = self.tokens.lock().expect("token lock").get(t).is_some_and(|exp| *exp > Instant::now());
                if !live {
                    // EC2 answers an expired or unknown token with 401 whatever the instance's
                    // token setting.
                    return (Response::text(401, "Unauthorized"), false);
                }
                true
            }
            None if self.md.tokens_required => return (Response::text(401, "Unauthorized"), false),
            None => false,
        };
        (self.get(path), with_token)
    }

    fn issue_token(&self, req: &Request) -> Response {
        if req.method != "PUT" {
            return Response::text(405, "Method Not Allowed");
        }
        // EC2 refuses token requests that went through a proxy, so a token never leaves the
        // instance.
        if req.header_value("x-forwarded-for").is_some() {
            return Response::text(403, "Forbidden");
        }
        let ttl = match req.header_value(TTL_HEADER).map(|v| v.trim().parse::<u64>()) {
            Some(Ok(t)) if (1..=MAX_TOKEN_TTL_SECS).contains(&t) => t,
            _ => return Response::text(400, "Bad Request"),
        };
        let mut bytes = [0u8; 32];
        rand::fill(&mut bytes);
        let token = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes);
        self.tokens.lock().expect("token lock").insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
        let mut r = Response::text(200, token);
        r.headers.push(("X-aws-ec2-metadata-token-ttl-seconds".into(), ttl.to_string()));
        r
    }

    fn get(&self, path: &str) -> Response {
        let trimmed = path.trim_start_matches('/');
        if trimmed.is_empty() {
            let mut v: Vec<&str> = VERSIONS.to_vec();
            v.push("latest");
            return Response::text(200, v.join("\n"));
        }
        let (version, rest) = trimmed.split_once('/').unwrap_or((trimmed, ""));
        if version != "latest" && !VERSIONS.contains(&version) {
            return Response::not_found();
        }
        match rest {
            "" => Response::text(200, "dynamic\nmeta-data\nuser-data"),
            "user-data" => match &self.md.user_data {
                Some(u) => Response { status: 200, body: u.clone(), headers: vec![] },
                None => Response::not_found(),
            },
            "dynamic" | "dynamic/" => Response::text(200, "instance-identity/"),
            "dynamic/instance-identity" | "dynamic/instance-identity/" => Response::text(200, "document"),
            "dynamic/instance-identity/document" => {
                let mut r = Response::text(200, self.identity_document());
                r.headers[0].1 = "application/json".into();
                r
            }
            _ => match rest.strip_prefix("meta-data") {
                Some(p) if p.is_empty() || p.starts_with('/') => self.meta_data(p.trim_start_matches('/')),
                _ => Response::not_found(),
            },
        }
    }

    /// A leaf's value, or a directory's children (subdirectories with a trailing `/`).
    fn meta_data(&self, path: &str) -> Response {
        let dir = path.trim_end_matches('/');
        if !path.ends_with('/') {
            if let Some(v) = self.tree.get(dir) {
                return Response::text(200, v.clone());
            }
        }
        if dir == "public-keys" {
            // EC2 lists keys as `index=name`; `public-keys/0/` then lists `openssh-key`.
            let lines: Vec<String> =
                self.md.public_keys.iter().enumerate().map(|(i, (n, _))| format!("{i}={n}")).collect();
            return if lines.is_empty() { Response::not_found() } else { Response::text(200, lines.join("\n")) };
        }
        let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
        let mut children: Vec<String> = Vec::new();
        for key in self.tree.keys() {
            let Some(rest) = key.strip_prefix(&prefix) else { continue };
            let child = match rest.split_once('/') {
                Some((d, _)) => format!("{d}/"),
                None => rest.to_string(),
            };
            if children.last() != Some(&child) {
                children.push(child);
            }
        }
        if dir.is_empty() && !self.md.public_keys.is_empty() {
            children.push("public-keys/".into());
            children.sort();
        }
        if children.is_empty() {
            Response::not_found()
        } else {
            Response::text(200, children.join("\n"))
        }
    }

    fn identity_document(&self) -> String {
        let m = &self.md;
        let doc = serde_json::json!({
            "accountId": m.account_id,
            "architecture": m.architecture,
            "availabilityZone": m.availability_zone,
            "billingProducts": null,
            "devpayProductCodes": null,
            "marketplaceProductCodes": null,
            "imageId": m.ami_id,
            "instanceId": m.instance_id,
            "instanceType": m.instance_type,
            "kernelId": null,
            "pendingTime": "2026-01-01T00:00:00Z",
            "privateIp": m.local_ipv4,
            "ramdiskId": null,
            "region": m.region,
            "version": "2017-09-30",
        });
        serde_json::to_string_pretty(&doc).expect("identity document serializes")
    }
}

/// The `meta-data/` leaves EC2 serves for an instance with one NIC in a VPC and no public IP.
fn meta_data_tree(m: &InstanceMetadata) -> BTreeMap<String, String> {
    let mut t = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        t.insert(k.to_string(), v.to_string());
    };
    put("ami-id", &m.ami_id);
    put("ami-launch-index", "0");
    put("ami-manifest-path", "(unknown)");
    put("block-device-mapping/ami", "/dev/xvda");
    put("block-device-mapping/root", "/dev/xvda");
    put("hostname", &m.local_hostname);
    put("instance-action", "none");
    put("instance-id", &m.instance_id);
    put("instance-life-cycle", "on-demand");
    put("instance-type", &m.instance_type);
    put("local-hostname", &m.local_hostname);
    put("local-ipv4", &m.local_ipv4);
    put("mac", &m.mac);
    put("placement/availability-zone", &m.availability_zone);
    put("placement/region", &m.region);
    put("profile", "default-hvm");
    put("reservation-id", "r-0kiln000000000000");
    put("security-groups", "default");
    put("services/domain", "amazonaws.com");
    put("services/partition", "aws");
    let nic = format!("network/interfaces/macs/{}", m.mac);
    for (k, v) in [
        ("device-number", "0"),
        ("interface-id", "eni-0kiln000000000000"),
        ("local-hostname", m.local_hostname.as_str()),
        ("local-ipv4s", m.local_ipv4.as_str()),
        ("mac", m.mac.as_str()),
        ("owner-id", m.account_id.as_str()),
        ("security-group-ids", "sg-0kiln000000000000"),
        ("security-groups", "default"),
        ("subnet-id", "subnet-0kiln00000000000"),
        ("subnet-ipv4-cidr-block", m.subnet_cidr.as_str()),
        ("vpc-id", "vpc-0kiln000000000000"),
        ("vpc-ipv4-cidr-block", m.subnet_cidr.as_str()),
        ("vpc-ipv4-cidr-blocks", m.subnet_cidr.as_str()),
    ] {
        t.insert(format!("{nic}/{k}"), v.to_string());
    }
    for (i, (_, key)) in m.public_keys.iter().enumerate() {
        t.insert(format!("public-keys/{i}/openssh-key"), key.clone());
    }
    t
}

#[derive(Debug, thiserror::Error)]
#[error("starting the metadata service on 127.0.0.1: {0}")]
pub struct ServeError(String);

/// The service on a loopback port, answering on a thread until dropped.
pub struct Server {
    imds: Arc<Imds>,
    http: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    addr: SocketAddr,
}

impl Server {
    pub fn start(md: InstanceMetadata) -> Result<Server, ServeError> {
        let http = Arc::new(tiny_http::Server::http("127.0.0.1:0").map_err(|e| ServeError(e.to_string()))?);
        let addr = http.server_addr().to_ip().ok_or_else(|| ServeError("no IP address".into()))?;
        let imds = Arc::new(Imds::new(md));
        let (h, i) = (http.clone(), imds.clone());
        let thread = std::thread::spawn(move || {
            for mut rq in h.incoming_requests() {
                let req = Request {
                    method: rq.method().as_str().to_ascii_uppercase(),
                    path: rq.url().to_string(),
                    headers: rq
                        .headers()
                        .iter()
                        .map(|hd| (hd.field.as_str().as_str().to_ascii_lowercase(), hd.value.as_str().to_string()))
                        .collect(),
                };
                // The body of a token PUT is empty; drain whatever came so the connection stays usable.
                let _ = std::io::copy(rq.as_reader(), &mut std::io::sink());
                let resp = i.handle(&req);
                let mut out = tiny_http::Response::from_data(resp.body).with_status_code(resp.status);
                for (n, v) in resp.headers {
                    if let Ok(hd) = tiny_http::Header::from_bytes(n.as_bytes(), v.as_bytes()) {
                        out.add_header(hd);
                    }
                }
                let _ = rq.respond(out);
            }
        });
        Ok(Server { imds, http, thread: Some(thread), addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn imds(&self) -> &Imds {
        &self.imds
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.http.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies a guest connection (stdin/stdout, as QEMU's `guestfwd=…-cmd:` hands it over) to the
/// service at `addr` and back, until both sides are done.
pub fn relay_stdio(addr: &str) -> std::io::Result<()> {
    use std::io::Write;
    let sock = std::net::TcpStream::connect(addr)?;
    let mut to_service = sock.try_clone()?;
    let upstream = std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut to_service);
        let _ = to_service.shutdown(std::net::Shutdown::Write);
    });
    // Every chunk is flushed as it comes: stdout is line-buffered, and an HTTP body need not
    // end in a newline, so a buffered copy would hold the answer back until the guest gives up.
    let mut from_service = sock;
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = std::io::Read::read(&mut from_service, &mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        out.flush()?;
    }
    drop(upstream);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(required: bool) -> InstanceMetadata {
        InstanceMetadata {
            public_keys: vec![("kiln".into(), "ssh-ed25519 AAAA kiln".into())],
            user_data: Some(b"#!/bin/sh\ntrue\n".to_vec()),
            tokens_required: required,
            ..InstanceMetadata::sample()
        }
    }

    fn token(imds: &Imds) -> String {
        let r = imds.handle(
            &Request { method: "PUT".into(), path: "/latest/api/token".into(), headers: vec![] }
                .header(TTL_HEADER, "21600"),
        );
        assert_eq!(r.status, 200);
        String::from_utf8(r.body).unwrap()
    }

    fn body(r: Response) -> String {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        String::from_utf8(r.body).unwrap()
    }

    #[test]
    fn token_flow_and_401_without_a_token_when_required() {
        let imds = Imds::new(md(true));
        assert_eq!(imds.handle(&Request::get("/latest/meta-data/instance-id")).status, 401);
        let t = token(&imds);
        let r = imds.handle(&Request::get("/2021-03-23/meta-data/instance-id").header(TOKEN_HEADER, &t));
        assert_eq!(body(r), "i-0123456789abcdef0");
        assert_eq!(imds.handle(&Request::get("/latest/meta-data/").header(TOKEN_HEADER, "forged")).status, 401);
        // A token needs a TTL in range, a PUT, and no proxy in between.
        let put = |h: Vec<(&str, &str)>| {
            let mut r = Request { method: "PUT".into(), path: "/latest/api/token".into(), headers: vec![] };
            for (n, v) in h {
                r = r.header(n, v);
            }
            imds.handle(&r).status
        };
        assert_eq!(put(vec![]), 400);
        assert_eq!(put(vec![(TTL_HEADER, "0")]), 400);
        assert_eq!(put(vec![(TTL_HEADER, "21601")]), 400);
        assert_eq!(put(vec![(TTL_HEADER, "60"), ("X-Forwarded-For", "10.0.0.1")]), 403);
        assert_eq!(imds.handle(&Request::get("/latest/api/token").header(TTL_HEADER, "60")).status, 405);
        let log = imds.log();
        assert!(log.iter().any(|e| e.with_token && e.path.ends_with("instance-id")));
        assert!(log.iter().any(|e| e.status == 401));
    }

    #[test]
    fn imdsv1_works_when_tokens_are_optional() {
        let imds = Imds::new(md(false));
        assert_eq!(body(imds.handle(&Request::get("/latest/meta-data/local-ipv4"))), "169.254.0.15");
    }

    /// The paths cloud-init's EC2 data source crawls: the meta-data index, directories with
    /// trailing slashes, `public-keys` as `0=name` then `0/openssh-key`, the NIC by MAC,
    /// user-data and the identity document.
    #[test]
    fn serves_the_tree_cloud_init_crawls() {
        let imds = Imds::new(md(true));
        let t = token(&imds);
        let get = |p: &str| imds.handle(&Request::get(p).header(TOKEN_HEADER, &t));
        let index = body(get("/2021-03-23/meta-data/"));
        for want in ["instance-id", "local-ipv4", "mac", "network/", "placement/", "public-keys/", "services/"] {
            assert!(index.lines().any(|l| l == want), "{want} missing from:\n{index}");
        }
        assert_eq!(body(get("/2021-03-23/meta-data/public-keys/")), "0=kiln");
        assert_eq!(body(get("/2021-03-23/meta-data/public-keys/0/")), "openssh-key");
        assert_eq!(body(get("/2021-03-23/meta-data/public-keys/0/openssh-key")), "ssh-ed25519 AAAA kiln");
        assert_eq!(body(get("/2021-03-23/meta-data/network/interfaces/macs/")), "02:00:00:00:00:01/");
        let nic = body(get("/2021-03-23/meta-data/network/interfaces/macs/02:00:00:00:00:01/"));
        assert!(nic.lines().any(|l| l == "device-number") && nic.lines().any(|l| l == "local-ipv4s"), "{nic}");
        assert_eq!(body(get("/2021-03-23/meta-data/placement/availability-zone")), "us-east-1a");
        assert_eq!(body(get("/2021-03-23/user-data")), "#!/bin/sh\ntrue\n");
        let doc: serde_json::Value =
            serde_json::from_str(&body(get("/2021-03-23/dynamic/instance-identity/document"))).unwrap();
        assert_eq!(doc["instanceId"], "i-0123456789abcdef0");
        assert_eq!(doc["region"], "us-east-1");
        assert_eq!(get("/2021-03-23/meta-data/no-such-thing").status, 404);
        assert_eq!(get("/1999-01-01/meta-data/").status, 404);
        let versions = body(get("/"));
        assert!(versions.lines().any(|l| l == "2021-03-23") && versions.lines().any(|l| l == "latest"));
    }

    #[test]
    fn no_user_data_is_404() {
        let imds = Imds::new(InstanceMetadata { user_data: None, ..md(false) });
        assert_eq!(imds.handle(&Request::get("/latest/user-data")).status, 404);
    }

    #[test]
    fn server_answers_over_http() {
        use std::io::{Read, Write};
        let s = Server::start(md(true)).unwrap();
        let mut c = std::net::TcpStream::connect(s.addr()).unwrap();
        write!(c, "PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n{TTL_HEADER}: 60\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let token = out.split("\r\n\r\n").nth(1).unwrap().to_string();
        let mut c = std::net::TcpStream::connect(s.addr()).unwrap();
        write!(c, "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n{TOKEN_HEADER}: {token}\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert!(out.ends_with("i-0123456789abcdef0"), "{out}");
        assert_eq!(s.imds().log().len(), 2);
    }
}
