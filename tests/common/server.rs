//! A real `plait serve` on a free loopback port, for the server's tests.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary to serve with: the release build when `.ci/run` names it (the default model's
/// long prompts need it), else this test build's.
pub fn plait_binary(release: bool) -> PathBuf {
    match std::env::var_os("PLAIT_RELEASE_BIN") {
        Some(path) if release => PathBuf::from(path),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_plait")),
    }
}

/// A running server; killed when dropped.
pub struct Served {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// What it wrote to stderr after the address line, filled by a thread.
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Served {
    /// Starts `plait serve --model MODEL --port 0 ARGS` and waits until /health is 200.
    pub fn start(binary: &Path, model: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(binary)
            .args(["serve", "--port", "0", "--model"])
            .arg(model)
            .args(args)
            .env(
                "PLAIT_CONFIG_DIR",
                std::env::temp_dir().join("plait-serve-test-no-config"),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("plait serve starts");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let base = loop {
            line.clear();
            if stderr.read_line(&mut line).unwrap() == 0 {
                let status = child.wait().unwrap();
                panic!("plait serve exited ({status}) before listening");
            }
            if let Some(address) = line.trim().strip_prefix("plait serve: listening on ") {
                break address.to_owned();
            }
        };
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut rest = String::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                rest.push_str(&String::from_utf8_lossy(&buf[..n]));
                *sink.lock().unwrap() = rest.clone();
            }
        });
        let served = Self { child, base, log };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = client().get(served.url("/health")).send() {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "the model did not load in 120 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        served
    }

    /// The full URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs `body` as JSON to `path`.
    pub fn post(&self, path: &str, body: &Value) -> reqwest::blocking::Response {
        client().post(self.url(path)).json(body).send().unwrap()
    }

    /// POSTs and reads a JSON answer, asserting its status.
    pub fn post_json(&self, path: &str, body: &Value, status: u16) -> Value {
        let response = self.post(path, body);
        assert_eq!(response.status().as_u16(), status, "{path} {body}");
        response.json().unwrap()
    }

    /// The value of a Prometheus metric (without labels).
    pub fn metric(&self, name: &str) -> f64 {
        let text = client()
            .get(self.url("/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }

    /// The process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit (bounded) and returns its status and stderr.
    pub fn wait(mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                let log = self.log.lock().unwrap().clone();
                return (status, log);
            }
            assert!(Instant::now() < deadline, "plait serve did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client with a bound on every request.
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

/// The JSON values of an SSE body's `data:` lines, up to `[DONE]` (which must come).
pub fn sse_values(response: reqwest::blocking::Response) -> Vec<Value> {
    assert_eq!(response.status(), 200);
    let mut values = Vec::new();
    for line in BufReader::new(response).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return values;
        }
        values.push(serde_json::from_str(data).unwrap());
    }
    values
}

/// The text of streamed chat completion chunks.
pub fn streamed_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// Runs `plait ARGS --json` and returns its JSON.
pub fn plait_json(binary: &Path, args: &[&str]) -> Value {
    let out = Command::new(binary)
        .args(args)
        .arg("--json")
        .env(
            "PLAIT_CONFIG_DIR",
            std::env::temp_dir().join("plait-serve-test-no-config"),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The program `var` names (installed by a script `.ci/run` runs), or `None` outside CI
/// when it is not set (the test then says so and passes).
pub fn installed_tool(var: &str, script: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(path) => Some(PathBuf::from(path)),
        None if std::env::var_os("CI").is_some() => {
            panic!("{var} is not set: .ci/run installs it with {script}")
        }
        None => {
            eprintln!("skipped: {var} is not set ({script} installs it)");
            None
        }
    }
}

/// The default model's GGUF, or `None` outside CI when it is not installed.
pub fn default_model_if_installed() -> Option<PathBuf> {
    match plait::config::DefaultModel::manifest().and_then(|m| m.installed_path()) {
        Ok(model) => Some(model),
        Err(e) if std::env::var_os("CI").is_some() => panic!("{e}: .ci/run installs it"),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// llama.cpp's llama-server on a free loopback port; killed when dropped.
pub struct LlamaServer {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl LlamaServer {
    /// Starts `server` on `model` with a `context`-token context, and waits until its
    /// /health is 200.
    pub fn start(server: &Path, model: &Path, context: usize) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(server)
            .arg("-m")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-c", &context.to_string(), "-t", "2", "--parallel", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("llama-server starts");
        let server = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = client().get(format!("{}/health", server.base)).send() {
                if r.status() == 200 {
                    return server;
                }
            }
            assert!(
                Instant::now() < deadline,
                "llama-server did not start in 120 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// llama-server on the default model with a `context`-token context, or `None` outside CI
/// when either is not installed.
pub fn llama_server_on_default_model(context: usize) -> Option<LlamaServer> {
    let binary = installed_tool("PLAIT_TEST_LLAMA_SERVER", "scripts/install-llama-server.sh")?;
    let model = default_model_if_installed()?;
    Some(LlamaServer::start(&binary, &model, context))
}
